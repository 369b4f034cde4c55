"""Side by side with torchft's Streaming DiLoCo on the same shaped link (needs root).

Two replicas (K=2, one rank each), each in its own network namespace, joined by a `tbf`-shaped
link (benchmarks/netns.py; no shaping for the "none" rate, whose tokens/s are the denominator
of utilisation). In one run, on one machine, every row trains the same model on the same
token streams for the same number of steps, with the same H, P, τ, inner AdamW and outer
Nesterov SGD (ds_configs/diloco_cpu.json's hyperparameters):

- torchft fp32: `torchft.local_sgd.DiLoCo` through benchmarks/torchft_replica.py (a lighthouse
  in node 0's namespace, one Manager per replica, torchft's ProcessGroupGloo);
- ours fp32, 4-bit and 2-bit EF: `python -m streaming_muloco.train --ds-config
  ds_configs/diloco_cpu.json` with the shipped 4-bit / 2-bit configs' compression sections;
- ours eager: eager updates with τ = H, fp32 and 2-bit EF.

Reported per row and link: tokens/s after warm-up, utilisation (tokens/s over the same row's
unshaped tokens/s), bytes per inner step per replica measured on the wire (the namespace's
eth0 tx counter, so TCP/IP headers, quorum and heartbeat traffic included), the time the
training thread spent in sync calls, and the final eval loss (the same eval batches).

    python benchmarks/bench_vs_torchft.py --rates none 100mbit 20mbit 5mbit --steps 100 --model small --n-embd 256 \\
        --micro-batch 4 --json benchmarks/results/vs_torchft.json --plot benchmarks/results/vs_torchft.png

Why 100 steps with H=30, P=2, τ=1: both libraries then have finished every fragment sync they
start (torchft syncs one fragment every H/P steps, at 15, 30, ..., 90; ours starts fragment 1
at 15, 45, 75 and fragment 0 at 30, 60, 90, each finishing one step later) and trained 9-10
local steps since, so the final eval scores both at the same phase of a round. Right after an
outer Nesterov step the loss is higher than a few steps later, and 90 steps would compare
torchft just after its last outer step with ours just before its last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overlap import run_one  # noqa: E402
from netns import PFX, SUBNET, Link, measure_mbit, sh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
       "RUST_LOG": "warn"}


def shipped_compression(file: str) -> dict:
    return json.loads((REPO / "ds_configs" / file).read_text())["streaming_muloco"]["compression"]


def rows(H: int) -> list[tuple[str, dict | None]]:
    """(label, our streaming_muloco overrides; None for torchft)."""
    two, four = shipped_compression("muloco_2bit_ef_cpu.json"), shipped_compression("muloco_4bit_cpu.json")
    return [("torchft fp32", None),
            ("ours fp32", {}),
            ("ours 4-bit", {"compression": four}),
            ("ours 2-bit EF", {"compression": two}),
            ("ours eager fp32 (tau=H)", {"eager_updates": True, "sync_delay": H}),
            ("ours eager 2-bit EF (tau=H)", {"eager_updates": True, "sync_delay": H, "compression": two})]


def tx_bytes() -> list[int]:
    return [int(sh("ip", "netns", "exec", f"{PFX}{i}", "cat", "/sys/class/net/eth0/statistics/tx_bytes").stdout)
            for i in range(2)]


def size_args(a: argparse.Namespace) -> list[str]:
    """--n-embd / --n-layer when given (both trainers take them)."""
    out = []
    for key in ("n_embd", "n_layer"):
        if getattr(a, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    return out


def run_ours(link: Link, a: argparse.Namespace, section: dict) -> dict:
    sets = [f"train_micro_batch_size_per_gpu={a.micro_batch}", f"streaming_muloco.sync_every={a.sync_every}",
            f"streaming_muloco.num_fragments={a.fragments}",
            f"streaming_muloco.sync_delay={section.get('sync_delay', a.sync_delay)}"]
    sets += [f"streaming_muloco.{key}={json.dumps(value)}" for key, value in section.items() if key != "sync_delay"]
    r = run_one(link, "ds_configs/diloco_cpu.json", sets, a.steps, a.model,
                extra=(*size_args(a), "--seed", str(a.seed)), eval_batches=a.eval_batches)
    return {"tokens_per_s": r["steady_tokens_per_s"], "final_eval_loss": r["final_eval_loss"],
            # launch (pseudo-gradient, eager step, compression if inline, send), wait, outer step, refresh
            "sync_seconds_on_training_thread": r["comm_launch_s"] + r["comm_exposed_s"] + r["apply_s"] + r["refresh_s"],
            "comm_exposed_s": r["comm_exposed_s"], "counted_bytes_per_rank": r["bytes_sent_per_rank"],
            "outer_steps": r["outer_steps"], "num_params": r["num_params"]}


def run_torchft(a: argparse.Namespace) -> dict:
    port = 29600 + os.getpid() % 300
    lighthouse = subprocess.Popen(["ip", "netns", "exec", f"{PFX}0", sys.executable, "-m",
                                   "streaming_muloco.lighthouse", "--port", str(port), "--min-replicas", "2"],
                                  env={**os.environ, **ENV}, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    try:
        line = lighthouse.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"lighthouse did not start: {line}{lighthouse.stdout.read()[-2000:]}")
        with tempfile.TemporaryDirectory() as out:
            procs = []
            for i in range(2):
                argv = [sys.executable, "benchmarks/torchft_replica.py", "--replica-id", str(i),
                        "--lighthouse", f"http://{SUBNET}.1:{port}", "--hostname", f"{SUBNET}.{i + 1}",
                        "--steps", str(a.steps), "--sync-every", str(a.sync_every), "--fragments", str(a.fragments),
                        "--sync-delay", str(a.sync_delay), "--micro-batch", str(a.micro_batch),
                        "--eval-batches", str(a.eval_batches), "--seed", str(a.seed), "--out", f"{out}/r{i}.json",
                        "--model", a.model, *size_args(a)]
                env = {**os.environ, **ENV, "GLOO_SOCKET_IFNAME": "eth0"}
                procs.append(subprocess.Popen(["ip", "netns", "exec", f"{PFX}{i}", *argv], env=env, cwd=REPO,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            texts = [p.communicate(timeout=1800)[0] for p in procs]
            for p, text in zip(procs, texts):
                if p.returncode != 0:
                    raise RuntimeError(f"torchft replica failed (rc={p.returncode}):\n{text[-3000:]}")
            rs = [json.loads(Path(out, f"r{i}.json").read_text()) for i in range(2)]
    finally:
        lighthouse.terminate()
        lighthouse.wait(timeout=30)
    return {"tokens_per_s": min(r["steady_tokens_per_s"] for r in rs),
            "final_eval_loss": sum(r["eval_loss_sum"] for r in rs) / sum(r["eval_batches"] for r in rs),
            "sync_seconds_on_training_thread": max(r["sync_seconds_on_training_thread"] for r in rs),
            "comm_exposed_s": None, "counted_bytes_per_rank": None, "outer_steps": rs[0]["outer_commits"],
            "num_params": rs[0]["num_params"]}


def plot(rows_: list[dict], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in dict.fromkeys(r["label"] for r in rows_):
        pts = sorted((r["achieved_mbit"], r["utilisation"]) for r in rows_
                     if r["label"] == label and r["rate"] != "none")
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="--" if label.startswith("torchft") else "-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("link rate achieved (Mbit/s, per direction)")
    ax.set_ylabel("utilisation (tokens/s shaped / unshaped)")
    ax.set_ylim(0, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", nargs="+", default=["none", "100mbit", "20mbit"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--model", default="small")
    ap.add_argument("--n-embd", type=int, default=None)
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=30)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--sync-delay", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234, help="model init and data order, for both libraries")
    ap.add_argument("--only", help="comma-separated row labels to run (default: all)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args()
    if "none" not in a.rates:
        ap.error("--rates must include none: utilisation is shaped tokens/s over unshaped")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    wanted = None if a.only is None else set(a.only.split(","))
    todo = [(label, sec) for label, sec in rows(a.sync_every) if wanted is None or label in wanted]
    results = []
    for rate in a.rates:
        with Link(2, rate) as link:
            achieved = measure_mbit() if rate != "none" else None
            print(f"== link {rate}" + (f": achieved {achieved:.1f} Mbit/s" if achieved else ""), flush=True)
            for label, section in todo:
                before, t0 = tx_bytes(), time.perf_counter()
                r = run_torchft(a) if section is None else run_ours(link, a, section)
                sent = [x - y for x, y in zip(tx_bytes(), before)]
                r.update(label=label, rate=rate, achieved_mbit=achieved, wall_s=round(time.perf_counter() - t0, 1),
                         wire_bytes_per_step_per_replica=sum(sent) / len(sent) / a.steps)
                results.append(r)
                print(f"   {label:<28} {r['tokens_per_s']:9.0f} tok/s  {r['wire_bytes_per_step_per_replica'] / 1e3:9.1f}"
                      f" kB/step  sync on thread {r['sync_seconds_on_training_thread']:6.2f} s  eval "
                      f"{r['final_eval_loss']:.4f}", flush=True)
    base = {r["label"]: r["tokens_per_s"] for r in results if r["rate"] == "none"}
    for r in results:
        r["utilisation"] = r["tokens_per_s"] / base[r["label"]]
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "machine": "2 vCPU, CPU only, gloo; each replica in its own network namespace, OMP_NUM_THREADS=1",
            "command": " ".join(["python"] + sys.argv), "settings": vars(a)}
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    if a.plot:
        print(plot(results, a.plot))
    print("| link | row | tokens/s | utilisation | wire bytes/step/replica | sync s on thread | eval loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rate']} | {r['label']} | {r['tokens_per_s']:.0f} | {r['utilisation']:.2f} | "
              f"{r['wire_bytes_per_step_per_replica']:,.0f} | {r['sync_seconds_on_training_thread']:.2f} | "
              f"{r['final_eval_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
