"""Overlap on a real bandwidth-limited link: exposed comm per outer round, tau = 0 vs tau >= 1.

Two ranks (K=2 replicas x D=1), each in its own network namespace, joined by a `tbf`-shaped
link (benchmarks/netns.py). Each run trains the `small` model with Muon inner and P fragments,
and reports what `wait()` blocked (exposed comm) against the compute that ran while the
fragment was in flight. Plain DeepSpeed data parallel over the same link is the reference.
Needs root.

    python benchmarks/bench_overlap.py --rates 100mbit 20mbit --steps 40 --json overlap.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import Link, measure_mbit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_one(link: Link, config: str, sets: list[str], steps: int, model: str, extra: tuple[str, ...] = (),
            eval_batches: int = 2) -> dict:
    """One training job on the link; its result.json. `extra`: more train.py arguments (e.g.
    --n-embd, --seed). (The SIGABRT once seen here in about 1 job in 16, "terminate called
    without an active exception", was a rank aborting at interpreter exit, fixed by
    streaming_muloco.exit_process: benchmarks/abort_loop.py. The retry this function used to make
    for it is gone.)"""
    with tempfile.TemporaryDirectory() as out:
        argv = ["-m", "streaming_muloco.train", "--ds-config", config, "--model", model, "--steps", str(steps),
                "--eval-every", str(steps), "--eval-batches", str(eval_batches), "--log-every", str(steps),
                "--no-save", "--out-dir", out, *extra]
        for s in sets:
            argv += ["--set", s]
        env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
        outs = link.run_ranks(argv, env=env, cwd=REPO, timeout=900)
        failed = [(rc, text) for rc, text in outs if rc != 0]
        if failed:
            raise RuntimeError(f"rank failed (rc={failed[0][0]}):\n{failed[0][1][-3000:]}")
        return json.loads(Path(out, "result.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", nargs="+", default=["100mbit", "20mbit"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="small")
    ap.add_argument("--sync-every", type=int, default=10)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--taus", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for rate in args.rates:
        with Link(2, rate) as link:
            achieved = measure_mbit()
            print(f"== link {rate}: achieved {achieved:.1f} Mbit/s", flush=True)
            dp = run_one(link, "ds_configs/dp_muon_cpu.json", [], args.steps, args.model)
            rows.append({"rate": rate, "achieved_mbit": achieved, "method": "DDP (DeepSpeed DP)", "tau": None,
                         "tokens_per_s": dp["tokens_per_s"]})
            print(f"   DDP: {dp['tokens_per_s']:.0f} tok/s", flush=True)
            for tau in args.taus:
                sets = [f"streaming_muloco.sync_every={args.sync_every}",
                        f"streaming_muloco.num_fragments={args.fragments}", f"streaming_muloco.sync_delay={tau}"]
                r = run_one(link, "ds_configs/streaming_muloco_cpu.json", sets, args.steps, args.model)
                rounds = max(r["outer_steps"], 1)
                row = {"rate": rate, "achieved_mbit": achieved, "method": "streaming MuLoCo", "tau": tau,
                       "tokens_per_s": r["tokens_per_s"], "outer_rounds": r["outer_steps"],
                       "exposed_s_per_round": r["comm_exposed_s"] / rounds,
                       "in_flight_compute_s_per_round": r["comm_hidden_s"] / rounds,
                       "bytes_sent_per_rank": r["bytes_sent_per_rank"]}
                rows.append(row)
                print(f"   tau={tau}: exposed {row['exposed_s_per_round']:.3f} s/round, compute while in flight "
                      f"{row['in_flight_compute_s_per_round']:.3f} s/round, {r['tokens_per_s']:.0f} tok/s", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": "2 vCPU, CPU only, gloo",
            "command": " ".join(["python"] + sys.argv)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
