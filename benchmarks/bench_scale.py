"""Scale check: a model of >= 100M parameters for a few steps with K=2, against DP-Muon.

Runs the training entry point (`python -m streaming_muloco.train`) on a 16-layer x 768 model
(113M parameters), 4 inner steps, an outer sync every 2 (2 syncs per rank, sync_delay 0, so a
sync's exchange is its blocking wait). Rows:
- DP-Muon, 1 rank: one replica alone, whose ZeRO shard (D=1: the whole model) is the shard each
  replica of the K=2 runs holds;
- MuLoCo fp32 and MuLoCo 2-bit EF, K=2 x D=1 (2 ranks), outer state on the engine's device;
- MuLoCo 2-bit EF with `outer_state_device: "cpu"`.

Per run, from result.json (rank 0): seconds per outer sync to compress (error feedback +
quantization), to exchange (the blocking wait on the collective), to apply (outer step and
write-back into the fp32 shard) and to refresh the module's params; the outer state's bytes
(theta_g, momentum, EF) on the device and in host memory against the rank's fp32 shard; peak
RSS (`ru_maxrss`) against DP-Muon's. On this CPU machine the engine's device is host memory,
so "device" and "host" are the same RAM; the split says where a GPU run would put it.

    python benchmarks/bench_scale.py --json benchmarks/results/scale.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from multirank import run_ranks  # noqa: E402

MODEL = ["--n-layer", "16", "--n-embd", "768", "--n-head", "12", "--block-size", "64"]
TWO_BIT = ["--ds-config", "ds_configs/muloco_2bit_ef_cpu.json"]
RUNS = {  # name -> (argv, ranks)
    "DP-Muon (1 rank)": (["--ds-config", "ds_configs/dp_muon_cpu.json"], 1),
    "MuLoCo fp32 (K=2 x D=1)": (["--ds-config", "ds_configs/muloco_cpu.json"], 2),
    "MuLoCo 2-bit EF (K=2 x D=1)": (TWO_BIT, 2),
    "MuLoCo 2-bit EF, outer state on host (K=2 x D=1)": (
        TWO_BIT + ["--set", "streaming_muloco.outer_state_device=\"cpu\""], 2),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, (config, ranks) in RUNS.items():
        with tempfile.TemporaryDirectory() as out:
            argv = ["-m", "streaming_muloco.train", *config, *MODEL, "--steps", str(args.steps),
                    "--eval-every", str(args.steps), "--eval-batches", "1", "--log-every", "1", "--no-save",
                    "--out-dir", out, "--set", "train_micro_batch_size_per_gpu=1"]
            if "MuLoCo" in name:
                argv += ["--set", f"streaming_muloco.sync_every={args.sync_every}",
                         "--set", "streaming_muloco.num_fragments=1", "--set", "streaming_muloco.sync_delay=0"]
            res = run_ranks(ranks, argv, timeout=3000)
            if not res.ok:
                print(res.describe(), file=sys.stderr)
                return 1
            r = json.loads(Path(out, "result.json").read_text())
        row = {"run": name, "ranks": ranks, "params": r["num_params"], "peak_rss_mb": r["peak_rss_mb"],
               "seconds": r.get("seconds"), "outer_state_bytes": r.get("outer_state_bytes")}
        n_sync = r.get("syncs_finished", 0)
        if n_sync:
            row["per_sync_s"] = {"compress": r["compress_s"] / n_sync, "exchange_wait": r["comm_exposed_s"] / n_sync,
                                 "launch_total": r["comm_launch_s"] / n_sync, "apply": r["apply_s"] / n_sync,
                                 "refresh": r["refresh_s"] / n_sync}
            row["syncs"] = n_sync
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["peak_rss_mb"]
    print("\n| run | params | outer state (device / host) | x fp32 shard | rank-0 peak RSS | vs DP-Muon | "
          "beyond the outer state | compress s/sync | exchange s/sync | apply s/sync | refresh s/sync |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        st = row["outer_state_bytes"] or {"total": 0, "shard_fp32": 0, "host": 0, "device": 0}
        shard = st["shard_fp32"] or 4 * row["params"]
        extra = row["peak_rss_mb"] - base
        beyond = extra - st["total"] / 2**20
        ps = row.get("per_sync_s", {})
        row["derived"] = {"x_shard": st["total"] / shard, "rss_vs_dp_mb": extra, "beyond_state_mb": beyond,
                          "beyond_state_x_shard": beyond * 2**20 / shard}
        print(f"| {row['run']} | {row['params'] / 1e6:.1f}M | {st.get('device', 0) / 2**20:.0f} / "
              f"{st.get('host', 0) / 2**20:.0f} MB | {st['total'] / shard:.2f} | {row['peak_rss_mb']:.0f} MB | "
              f"{extra:+.0f} MB | {beyond:+.0f} MB ({beyond * 2**20 / shard:+.2f} x shard) | "
              f"{ps.get('compress', 0):.2f} | {ps.get('exchange_wait', 0):.2f} | {ps.get('apply', 0):.2f} | "
              f"{ps.get('refresh', 0):.2f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "streaming_muloco"], cwd=REPO, capture_output=True,
                           text=True).stdout.split()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "library_files_modified": dirty[1::2],
            "machine": f"{platform.machine()}, CPU, gloo", "command": " ".join(["python"] + sys.argv),
            "steps": args.steps, "sync_every": args.sync_every}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
