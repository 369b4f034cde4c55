"""The sparse 2-bit search (issue 13), in the simulator: which outer optimizer and EF setting
bring SparseLoCo-style compression close to uncompressed MuLoCo.

Settings as benchmarks/eager_quality.py: K=4, H=30, 1,500 inner steps (50 rounds), 16 sequences
of 64 tokens per step split over the replicas, tiny model, Muon inner at MuLoCo's tuned rates,
unless a row names DiLoCo (AdamW inner) or the "small" model. Each row sets the compression
section and the outer optimizer and is compared with its own fp32 row on the same seeds;
finished runs are appended to the JSONL file, and a rerun skips what is there.

    nice -n 5 python benchmarks/sparse_search.py --out benchmarks/results/sparse_search.jsonl --shard 0/2 &
    nice -n 5 python benchmarks/sparse_search.py --out benchmarks/results/sparse_search.jsonl --shard 1/2
    python benchmarks/sparse_search.py --out benchmarks/results/sparse_search.jsonl --report

Date 2026-11-25, seeds 1 and 2, commits 576b43b..ca9f9d2: see BENCHMARKS.md ("Sparse search").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jsonl_grid  # noqa: E402
from quality_sweep import METHODS, REPO, Hyper, Settings, run_one  # noqa: E402

from streaming_muloco.data import TokenSplits  # noqa: E402

SETTINGS = Settings(steps=1500, sync_every=30, global_batch=16, block=64, eval_every=300, eval_total=16,
                    eval_micro=8, ks=(4,))
SPARSE = json.loads((REPO / "ds_configs/muloco_sparse_cpu.json").read_text())["streaming_muloco"]["compression"]
NESTEROV = {"outer_lr": 0.8, "outer_momentum": 0.8}  # muloco_cpu.json's
PLAIN = {"outer_lr": 1.0, "outer_momentum": 0.0}  # SparseLoCo's (muloco_sparse_cpu.json's)
DILOCO = {"base": "diloco_cpu.json", "inner_mult": 2.0}  # AdamW inner, at DiLoCo's tuned inner lr
ROWS: dict[str, dict] = {
    "fp32, outer 0.8/0.8": {**NESTEROV},
    "fp32, outer 1.0/0": {**PLAIN},
    "sparse 3% EF b0.95, outer 1.0/0 (shipped)": {**PLAIN, "compression": SPARSE},
    "sparse 3% EF b1, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "ef_beta": 1.0}},
    "sparse 3% EF b0.95, outer 0.8/0.8": {**NESTEROV, "compression": SPARSE},
    "sparse 3% EF b1, outer 0.8/0.8": {**NESTEROV, "compression": {**SPARSE, "ef_beta": 1.0}},
    "sparse 5% EF b0.95, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "topk_fraction": 0.05}},
    "sparse 3% two-phase EF b0.95, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "collective": "two_phase"}},
    # a second pass around the first's best (outer 1.0/0): larger outer steps, denser, smaller chunks
    "sparse 3% EF b0.95, outer 1.5/0": {"outer_lr": 1.5, "outer_momentum": 0.0, "compression": SPARSE},
    "sparse 3% EF b0.95, outer 2.0/0": {"outer_lr": 2.0, "outer_momentum": 0.0, "compression": SPARSE},
    "sparse 10% EF b0.95, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "topk_fraction": 0.10}},
    "sparse 3% chunk 1024 EF b0.95, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "block_size": 1024}},
    # a third pass: the density that meets the bytes goal single-phase (about 2,000x at 1.5%), and
    # SparseLoCo as its paper ran it, with AdamW inner steps, against its own baseline (DiLoCo fp32
    # at DiLoCo's tuned rates: inner lr x2, outer 0.5 with Nesterov 0.8)
    "sparse 1.5% EF b0.95, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "topk_fraction": 0.015}},
    "DiLoCo fp32, inner x2, outer 0.5/0.8": {"outer_lr": 0.5, "outer_momentum": 0.8, **DILOCO},
    "DiLoCo sparse 3% EF b0.95, inner x2, outer 1.0/0": {**PLAIN, "compression": SPARSE, **DILOCO},
    "DiLoCo sparse 1.5% EF b0.95, inner x2, outer 1.0/0": {**PLAIN, "compression": {**SPARSE, "topk_fraction": 0.015},
                                                           **DILOCO},
    # does the sparse gap shrink with the model? model.py's "small" preset (4 layers x 128, ~6x tiny)
    "small: fp32, outer 0.8/0.8": {**NESTEROV, "model": "small"},
    "small: sparse 3% EF b0.95, outer 1.0/0 (shipped)": {**PLAIN, "compression": SPARSE, "model": "small"},
}
for _name, _extra in ROWS.items():  # registered as quality_sweep methods, so run_one builds them alike
    _extra = dict(_extra)
    _base = _extra.pop("base", "muloco_cpu.json")
    _extra.pop("inner_mult", None)
    _extra.pop("model", None)
    METHODS[_name] = (_base, _extra)


def reference(name: str) -> str:
    """The uncompressed row a row is compared with: same model, same inner optimizer."""
    if name.startswith("small:"):
        return "small: fp32, outer 0.8/0.8"
    return "DiLoCo fp32, inner x2, outer 0.5/0.8" if name.startswith("DiLoCo") else "fp32, outer 0.8/0.8"


def report(done: list[dict]) -> str:
    """Each row against its fp32 row on the same seeds only (the mean of the per-seed gaps)."""
    by: dict[str, dict[int, float]] = {}
    for r in done:
        by.setdefault(r["label"], {})[r["seed"]] = r["final_eval_loss"]
    lines = ["| row | eval loss (seed: loss) | vs its fp32 row, same seeds | MB / replica |", "|---|---|---|---:|"]
    mb = {r["label"]: r["bytes_sent_per_replica"] / 1e6 for r in done}
    for name in ROWS:
        v, ref = by.get(name), by.get(reference(name), {})
        if v:
            gaps = [v[sd] - ref[sd] for sd in v if sd in ref]
            delta = f"{statistics.mean(gaps):+.4f}" if gaps else "-"
            losses = ", ".join(f"{sd}: {x:.4f}" for sd, x in sorted(v.items()))
            lines.append(f"| {name} | {losses} | {delta} | {mb[name]:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jsonl_grid.add_arguments(ap)
    ap.add_argument("--rows", type=lambda v: [r.strip() for r in v.split(";")], default=list(ROWS),
                    help="';'-separated row names")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    if args.report:
        print(report(jsonl_grid.load_rows(args.out)))
        return 0
    s = Settings(**{**SETTINGS.__dict__, "ks": (args.k,)})

    def run(name: str, k: int, seed: int, splits: TokenSplits) -> dict:
        sm = Settings(**{**s.__dict__, "model": ROWS[name].get("model", "tiny")})
        row = run_one(name, k, Hyper(ROWS[name].get("inner_mult", 1.0), ROWS[name]["outer_lr"]), sm, splits, seed)
        row.update(settings=s.__dict__, config=ROWS[name])
        return row

    points = [(name, args.k, seed) for seed in map(int, args.seeds.split(",")) for name in args.rows]
    jsonl_grid.run_grid(args.out, points, args.shard, s.block, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
