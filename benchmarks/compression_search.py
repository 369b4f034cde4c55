"""The 2-bit search behind ds_configs/muloco_2bit_ef_cpu.json, in the simulator.

Settings mimic the 300-step real run of the issue (`mpirun_local.sh 4 ds_configs/...json
--steps 300`: K=2 replicas x D=2 ranks x micro 16 = 32 sequences per replica per step): K=2,
64 sequences per step split over the replicas, H=30, 300 inner steps = 10 outer rounds, one
seed (1234), the learning rates of muloco_cpu.json. Each row changes the compression section only.

    python benchmarks/compression_search.py               # every row, ~25 s each on 2 vCPU
    python benchmarks/compression_search.py --rows "fp32,stat2 clip2 row eta"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_sweep import METHODS, Hyper, Settings, run_one  # noqa: E402

from streaming_muloco.data import TokenSplits, load_tokens  # noqa: E402

S = Settings(steps=300, sync_every=30, global_batch=64, block=64, eval_every=300, eval_total=16, eval_micro=16,
             ks=(2,))
ROW = {"granularity": "row", "error_feedback": True}
ROWS: dict[str, dict] = {
    "fp32": {},
    "lin2 row": {"method": "linear", "bits": 2, **ROW},
    "lin2 row emb/head fp32": {"method": "linear", "bits": 2, **ROW, "compress_embedding": False,
                               "compress_head": False},
    "lin2 row eta": {"method": "linear", "bits": 2, **ROW, "ef_scale_by_outer_lr": True},
    "lin2 row eta b0.9": {"method": "linear", "bits": 2, **ROW, "ef_scale_by_outer_lr": True, "ef_beta": 0.9},
    "stat2 clip2 row eta": {"method": "statistical", "bits": 2, "stat_clip": 2.0, **ROW,
                            "ef_scale_by_outer_lr": True},
    "stat2 clip1.5 row eta (shipped)": {"method": "statistical", "bits": 2, "stat_clip": 1.5, **ROW,
                                        "ef_scale_by_outer_lr": True},
    "lin2 block-in-param 64 eta": {"method": "linear", "bits": 2, "block_size": 64, "granularity": "block",
                                   "error_feedback": True, "ef_scale_by_outer_lr": True},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=lambda v: [r.strip() for r in v.split(",")], default=list(ROWS))
    args = ap.parse_args()
    splits = TokenSplits.from_tokens(load_tokens(None), 0.05, S.block)
    for name in args.rows:
        METHODS[name] = ("muloco_cpu.json", {"compression": ROWS[name]} if ROWS[name] else {})
        run_one(name, 2, Hyper(), S, splits, 1234)
    return 0


if __name__ == "__main__":
    sys.exit(main())
