"""Bytes on the wire per rank per inner step: the outer loop's counter vs DDP's fp32 ring all-reduce.

Runs the real training entry point on K ranks (D=1) under torch.distributed (gloo, loopback)
and reads the bytes the outer loop handed to its collectives (ring model, `comm/base.py:
wire_bytes`). DDP's figure is the ring all-reduce of every fp32 gradient every step,
2*(W-1)/W*4*N bytes per rank per step, for the same model and world size.

    python benchmarks/bench_wire_bytes.py --ranks 4 --sync-every 30 --steps 60 --json out.json
    # a row's own --ds-config (the shipped compressed configs) comes after the default one and wins
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

METHODS = {
    "MuLoCo fp32": [],
    "MuLoCo 8-bit linear": ["--set", 'streaming_muloco.compression={"method":"linear","bits":8}'],
    "MuLoCo 4-bit statistical EF": ["--set", 'streaming_muloco.compression={"method":"statistical","bits":4}'],
    "MuLoCo 2-bit statistical EF": ["--set", 'streaming_muloco.compression={"method":"statistical","bits":2}'],
    "MuLoCo 2-bit linear EF": ["--set", 'streaming_muloco.compression={"method":"linear","bits":2}'],
    "MuLoCo 2-bit linear EF, two-phase": [
        "--set", 'streaming_muloco.compression={"method":"linear","bits":2,"collective":"two_phase"}'],
    # the shipped configs (compression section and, for sparse, its outer-optimizer keys)
    "MuLoCo 2-bit shipped (statistical, per row)": ["--ds-config", "ds_configs/muloco_2bit_ef_cpu.json"],
    "MuLoCo sparse 2-bit shipped (3% per 4096-chunk)": ["--ds-config", "ds_configs/muloco_sparse_cpu.json"],
    "MuLoCo sparse 2-bit shipped, two-phase": ["--ds-config", "ds_configs/muloco_sparse_cpu.json",
                                               "--set", "streaming_muloco.compression.collective=two_phase"],
    "MuLoCo sparse 2-bit, 1% per chunk": ["--ds-config", "ds_configs/muloco_sparse_cpu.json",
                                          "--set", "streaming_muloco.compression.topk_fraction=0.01"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--sync-every", type=int, default=30)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(";")],
                    help="only these rows, separated by ';' (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, extra in METHODS.items():
        if args.methods and name not in args.methods:
            continue
        with tempfile.TemporaryDirectory() as out:
            argv = ["-m", "streaming_muloco.train", "--ds-config", "ds_configs/muloco_cpu.json", "--model", args.model,
                    "--steps", str(args.steps), "--eval-every", str(args.steps), "--eval-batches", "1", "--no-save",
                    "--log-every", str(args.steps), "--out-dir", out,
                    "--set", f"streaming_muloco.num_replicas={args.ranks}",
                    "--set", f"streaming_muloco.sync_every={args.sync_every}", *extra]
            res = run_ranks(args.ranks, argv, timeout=1200, env={"TORCHDYNAMO_DISABLE": "0"})
            if not res.ok:
                print(res.describe(), file=sys.stderr)
                return 1
            r = json.loads(Path(out, "result.json").read_text())
            params = int(res.outputs[0].split("model ")[1].split(": ")[1].split(" params")[0].replace(",", ""))
        W = args.ranks
        ddp = 2 * (W - 1) / W * 4 * params
        ours = r["bytes_sent_per_rank"] / args.steps
        rows.append({"method": name, "params": params, "bytes_per_step": ours, "ddp_bytes_per_step": ddp,
                     "reduction_vs_ddp": ddp / ours, "outer_rounds": r["outer_steps"]})
        print(f"{name:36s} {ours:12.1f} B/step/rank   DDP {ddp:12.1f}   {ddp / ours:7.1f}x fewer", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "machine": "2 vCPU, CPU, gloo",
            "command": " ".join(["python"] + sys.argv), "K": args.ranks, "H": args.sync_every}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
