"""Long-horizon quality of compressed MuLoCo/DiLoCo: >= 100 outer rounds, several seeds.

Single-process simulator (streaming_muloco/sim/, the distributed path's own outer loop), tiny
model, byte-level Shakespeare, H=30, 3,000 inner steps = 100 outer rounds, equal tokens per
step for every method and K (a global batch of G sequences split over the K replicas).
Learning rates are the ones `quality_sweep.py --tune` picked for MuLoCo and DiLoCo
(benchmarks/results/quality.json); the compressed rows use their method's rates.

Runs are independent, so the grid can be cut into shards run side by side; every finished
run is appended to the JSONL file at once, and a rerun skips what is there:

    nice -n 5 python benchmarks/long_horizon.py --out benchmarks/results/long_horizon.jsonl --shard 0/2 &
    nice -n 5 python benchmarks/long_horizon.py --out benchmarks/results/long_horizon.jsonl --shard 1/2
    python benchmarks/long_horizon.py --out benchmarks/results/long_horizon.jsonl --report
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

LONG = Settings(steps=3000, sync_every=30, global_batch=16, block=64, eval_every=300, eval_total=16, eval_micro=8,
                ks=(4, 8))
SEEDS = (1, 2, 3)
# rows of the table: (label, quality_sweep method, the tuned rates of which method)
ROWS = [("MuLoCo fp32", "MuLoCo", "MuLoCo"),
        ("MuLoCo 2-bit (shipped)", "MuLoCo 2-bit shipped", "MuLoCo"),
        ("MuLoCo 4-bit (shipped)", "MuLoCo 4-bit shipped", "MuLoCo"),
        ("MuLoCo sparse 2-bit (shipped)", "MuLoCo sparse shipped", "config"),
        ("DiLoCo fp32", "DiLoCo", "DiLoCo"),
        ("DiLoCo 2-bit", "DiLoCo 2-bit shipped", "DiLoCo"),
        ("DiLoCo sparse 2-bit (SparseLoCo's recipe)", "DiLoCo sparse shipped", "DiLoCo inner")]


def best_rates() -> dict[str, Hyper]:
    meta = json.loads((REPO / "benchmarks/results/quality.json").read_text())["meta"]["best"]
    rates = {m: Hyper(**meta[m]) for m in ("MuLoCo", "DiLoCo")}
    rates["config"] = Hyper(1.0, None)  # the shipped config's own outer lr (sparse: SparseLoCo's recipe)
    rates["DiLoCo inner"] = Hyper(rates["DiLoCo"].inner_mult, None)  # DiLoCo's inner lr, the config's outer lr
    return rates


def grid() -> list[tuple[str, int, int]]:
    return [(label, k, seed) for k in LONG.ks for seed in SEEDS for label, _, _ in ROWS]


def report(rows: list[dict]) -> str:
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        by.setdefault((r["label"], r["K"]), []).append(r["final_eval_loss"])
    base = {k: statistics.mean(by[("MuLoCo fp32", k)]) for k in LONG.ks if ("MuLoCo fp32", k) in by}
    dbase = {k: statistics.mean(by[("DiLoCo fp32", k)]) for k in LONG.ks if ("DiLoCo fp32", k) in by}
    head = "| method | " + " | ".join(f"K={k}: eval loss (mean ± std, n) | vs fp32" for k in LONG.ks) + " |"
    lines = [head, "|---|" + "---|---|" * len(LONG.ks)]
    for label, _, _ in ROWS:
        cells = []
        for k in LONG.ks:
            v = by.get((label, k), [])
            if not v:
                cells += ["-", "-"]
                continue
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            ref = (dbase if label.startswith("DiLoCo") else base).get(k)
            cells += [f"{statistics.mean(v):.4f} ± {sd:.4f} ({len(v)})",
                      f"{statistics.mean(v) - ref:+.4f}" if ref is not None else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jsonl_grid.add_arguments(ap)
    ap.add_argument("--steps", type=int, default=LONG.steps)
    args = ap.parse_args()
    if args.report:
        print(report(jsonl_grid.load_rows(args.out)))
        return 0
    s = Settings(**{**LONG.__dict__, "steps": args.steps})
    rates = best_rates()
    method_of = {label: (m, rates[r]) for label, m, r in ROWS}

    def run(label: str, k: int, seed: int, splits: TokenSplits) -> dict:
        method, hp = method_of[label]
        row = run_one(method, k, hp, s, splits, seed)
        row.update(settings=s.__dict__, config=METHODS[method][1])
        return row

    jsonl_grid.run_grid(args.out, grid(), args.shard, s.block, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
