"""Peak RSS per rank: MuLoCo's sharded outer state vs plain DeepSpeed data parallel.

Runs the training entry point for a few steps on 4 ranks (K=2 replicas x D=2 ZeRO-1 ranks for
the outer-loop methods, DP over 4 ranks for the baseline) with a mid-size model, and reads
rank 0's peak RSS (`ru_maxrss`). The outer state per rank should be about
(theta_g + outer momentum [+ EF residual]) = 2-3 x 4 bytes x N / D, never a full model copy.

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
RUNS = {
    "DP-Muon (ZeRO-1, 4 ranks)": ("ds_configs/dp_muon_cpu.json", []),
    "MuLoCo fp32 (K=2 x D=2)": ("ds_configs/muloco_cpu.json", []),
    "MuLoCo 2-bit EF (K=2 x D=2)": ("ds_configs/muloco_2bit_ef_cpu.json", []),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, (config, extra) in RUNS.items():
        with tempfile.TemporaryDirectory() as out:
            argv = ["-m", "streaming_muloco.train", "--ds-config", config, *MODEL, "--steps", str(args.steps),
                    "--eval-every", str(args.steps), "--eval-batches", "1", "--log-every", str(args.steps),
                    "--no-save", "--out-dir", out, "--set", "train_micro_batch_size_per_gpu=2",
                    "--set", "streaming_muloco.sync_every=2", *extra]
            res = run_ranks(4, argv, timeout=1200)
            if not res.ok:
                print(res.describe(), file=sys.stderr)
                return 1
            r = json.loads(Path(out, "result.json").read_text())
            params = int(res.outputs[0].split("model ")[1].split(": ")[1].split(" params")[0].replace(",", ""))
        rows.append({"run": name, "params": params, "peak_rss_mb": r["peak_rss_mb"]})
        print(f"{name:32s} N={params:,}  rank-0 peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    n = rows[0]["params"]
    shard_mb = 4 * n / 2 / 2**20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "machine": "2 vCPU, CPU, gloo",
            "command": " ".join(["python"] + sys.argv), "fp32_shard_mb_per_rank": shard_mb,
            "full_model_fp32_mb": 4 * n / 2**20}
    print(f"one fp32 ZeRO shard (N/D, D=2): {shard_mb:.0f} MB; a full fp32 model copy: {4 * n / 2**20:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
