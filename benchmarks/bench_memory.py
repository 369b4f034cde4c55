"""Memory per rank: MuLoCo's sharded outer state vs plain DeepSpeed data parallel.

Runs the training entry point for a few steps with a mid-size model: the baseline is DP-Muon
with ZeRO-1 on 2 ranks, i.e. one replica alone with the same per-rank ZeRO shard (N/2) as each
replica of the outer-loop runs (K=2 replicas x D=2 ZeRO-1 ranks, 4 ranks). Two measures:
- the outer loop's own persistent state per rank, counted exactly from its tensors
  (`OuterSync.state_nbytes`: theta_g, outer momentum, EF residuals), against the rank's fp32
  shard: 2x for fp32 MuLoCo, 3x with EF, never a multiple of the full model;
- rank 0's peak RSS (`ru_maxrss`), which also holds transient buffers and the allocator's slack.

    python benchmarks/bench_memory.py --json benchmarks/results/memory.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from multirank import run_ranks  # noqa: E402

MODEL = ["--model", "small", "--n-layer", "8", "--n-embd", "512", "--n-head", "8", "--block-size", "64"]
RUNS = {  # name -> (config, ranks)
    "DP-Muon (ZeRO-1, D=2: one replica alone)": ("ds_configs/dp_muon_cpu.json", 2),
    "MuLoCo fp32 (K=2 x D=2)": ("ds_configs/muloco_cpu.json", 4),
    "MuLoCo 2-bit EF (K=2 x D=2)": ("ds_configs/muloco_2bit_ef_cpu.json", 4),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, (config, ranks) in RUNS.items():
        with tempfile.TemporaryDirectory() as out:
            argv = ["-m", "streaming_muloco.train", "--ds-config", config, *MODEL, "--steps", str(args.steps),
                    "--eval-every", str(args.steps), "--eval-batches", "1", "--log-every", str(args.steps),
                    "--no-save", "--out-dir", out, "--set", "train_micro_batch_size_per_gpu=2"]
            if "MuLoCo" in name:
                argv += ["--set", "streaming_muloco.sync_every=2"]
            res = run_ranks(ranks, argv, timeout=1200)
            if not res.ok:
                print(res.describe(), file=sys.stderr)
                return 1
            r = json.loads(Path(out, "result.json").read_text())
        state = r.get("outer_state_bytes", {"total": 0, "shard_fp32": 0})
        rows.append({"run": name, "ranks": ranks, "params": r["num_params"], "peak_rss_mb": r["peak_rss_mb"],
                     "outer_state_bytes": state, "outer_steps": r["outer_steps"]})
        ratio = state["total"] / state["shard_fp32"] if state["shard_fp32"] else 0.0
        print(f"{name:42s} N={r['num_params']:,}  rank-0 peak RSS {r['peak_rss_mb']:.0f} MB  outer state "
              f"{state['total'] / 2**20:.1f} MB = {ratio:.2f} x the rank's fp32 shard", flush=True)
    n = rows[0]["params"]
    shard_mb = 4 * n / 2 / 2**20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "machine": "2 vCPU, CPU, gloo",
            "command": " ".join(["python"] + sys.argv), "fp32_shard_mb_per_rank": shard_mb,
            "full_model_fp32_mb": 4 * n / 2**20}
    print(f"one fp32 ZeRO shard (N/D, D=2): {shard_mb:.1f} MB; a full fp32 model copy: {4 * n / 2**20:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
