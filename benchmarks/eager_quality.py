"""Eval loss at equal tokens of Streaming MuLoCo with and without eager updates, over sync_delay.

Single-process simulator (streaming_muloco/sim/, the distributed path's own outer loop and
schedule), tiny model, byte-level Shakespeare, K replicas, H=30, P=2 fragments (H/P = 15),
τ in {0, 1, H/P/2, H/P−1} = {0, 1, 7, 14} without eager updates (mix_alpha 0, the shipped
streaming config's), and the same τ plus τ = H = 30 with them. Equal tokens per step for every
row (a global batch of 16 sequences split over the K replicas). Learning rates: the ones
`quality_sweep.py --tune` picked for Streaming MuLoCo (benchmarks/results/quality.json).

Every finished run is appended to the JSONL file at once; a rerun skips what is there, and
`--shard i/n` runs every n-th grid point so that shards can run side by side:

    nice -n 5 python benchmarks/eager_quality.py --out benchmarks/results/eager_quality.jsonl --shard 0/2 &
    nice -n 5 python benchmarks/eager_quality.py --out benchmarks/results/eager_quality.jsonl --shard 1/2
    python benchmarks/eager_quality.py --out benchmarks/results/eager_quality.jsonl --report
    # eager updates' own outer lr x momentum (τ = H, seed 1), into the same file:
    nice -n 5 python benchmarks/eager_quality.py --out benchmarks/results/eager_quality.jsonl --tune --shard 0/2 &
    nice -n 5 python benchmarks/eager_quality.py --out benchmarks/results/eager_quality.jsonl --tune --shard 1/2
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

H, P = 30, 2
TAUS = (0, 1, H // P // 2, H // P - 1)
SETTINGS = Settings(steps=1500, sync_every=H, global_batch=16, block=64, eval_every=300, eval_total=16,
                    eval_micro=8, ks=(4,))
SEEDS = (1, 2)


# The outer lr and momentum that --tune found best for eager updates (seed 1; the table's
# "tuned" columns rerun them with every seed, for eager updates and, as a check, delayed τ=1, 14).
EAGER_TUNED = (1.0, 0.0)


def label(tau: int, eager: bool, tuned: bool = False) -> str:
    return f"{'eager' if eager else 'delayed'} tau={tau}" + (" tuned" if tuned else "")


def rows() -> list[tuple[int, bool, bool]]:
    return ([(t, False, False) for t in TAUS] + [(t, True, False) for t in (*TAUS, H)]
            + [(t, True, True) for t in (0, H)] + [(t, False, True) for t in (0, 1, H // P - 1)])


for _tau, _eager, _tuned in rows():  # registered as quality_sweep methods, so run_one builds them alike
    METHODS[label(_tau, _eager, _tuned)] = (
        "streaming_muloco_cpu.json",
        {"num_fragments": P, "sync_delay": _tau, "mix_alpha": 0.0, "eager_updates": _eager,
         **({"outer_lr": EAGER_TUNED[0], "outer_momentum": EAGER_TUNED[1]} if _tuned else {})})


# --tune: eager updates at τ = H over outer lr x outer momentum, seed 1 (the delayed rows keep
# the rates tuned for Streaming MuLoCo; eager steps on a mostly one-round-old average, for which
# a smaller outer step may suit)
TUNE = [(lr, mu) for mu in (0.8, 0.5, 0.0) for lr in (0.2, 0.35, 0.5, 0.8)] + \
    [(1.0, 0.0), (1.2, 0.0), (0.5, 0.3), (0.8, 0.3)]  # a second pass around the first's best


def tune_label(lr: float, mu: float) -> str:
    return f"eager tau={H} outer_lr={lr} momentum={mu}"


for _lr, _mu in TUNE:
    METHODS[tune_label(_lr, _mu)] = ("streaming_muloco_cpu.json",
                                     {"num_fragments": P, "sync_delay": H, "mix_alpha": 0.0, "eager_updates": True,
                                      "outer_momentum": _mu, "outer_lr": _lr})


def report(done: list[dict]) -> str:
    by: dict[tuple[str, int], list[float]] = {}
    for r in done:
        by.setdefault((r["label"], r["K"]), []).append(r["final_eval_loss"])
    lines = []
    for k in sorted({r["K"] for r in done}):
        base = by.get((label(0, False), k))
        ref = statistics.mean(base) if base else None
        tuned_name = f"outer lr {EAGER_TUNED[0]}, momentum {EAGER_TUNED[1]}"
        lines += [f"K={k}, H={H}, P={P}; eval loss (mean ± std, seeds) and its difference to delayed τ=0:", "",
                  "| τ | delayed, outer lr 0.5, momentum 0.8 | Δ | delayed, " + tuned_name + " | Δ | eager, outer lr "
                  "0.5, momentum 0.8 | Δ | eager, " + tuned_name + " | Δ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for tau in (*TAUS, H):
            cells = []
            for eager, tuned in ((False, False), (False, True), (True, False), (True, True)):
                v = by.get((label(tau, eager, tuned), k), [])
                if not v:
                    cells += ["not allowed" if (tau >= H / P and not eager) else "-", "-"]
                    continue
                sd = statistics.stdev(v) if len(v) > 1 else float("nan")
                cells += [f"{statistics.mean(v):.4f} ± {sd:.4f} ({len(v)})",
                          f"{statistics.mean(v) - ref:+.4f}" if ref is not None else "-"]
            lines.append(f"| {tau} | " + " | ".join(cells) + " |")
        lines.append("")
        tuned = sorted((r["final_eval_loss"], r["label"]) for r in done if r["K"] == k and r.get("tune"))
        if tuned:
            lines += ["| eager, τ = H, seed 1 | eval loss |", "|---|---|"]
            lines += [f"| {name.split(' ', 2)[2]} | {loss:.4f} |" for loss, name in tuned]
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jsonl_grid.add_arguments(ap)
    ap.add_argument("--steps", type=int, default=SETTINGS.steps)
    ap.add_argument("--k", type=int, default=SETTINGS.ks[0])
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--tune", action="store_true", help="the eager outer lr x momentum grid (seed 1) instead")
    args = ap.parse_args()
    if args.report:
        print(report(jsonl_grid.load_rows(args.out)))
        return 0
    s = Settings(**{**SETTINGS.__dict__, "steps": args.steps, "ks": (args.k,)})
    best = json.loads((REPO / "benchmarks/results/quality.json").read_text())["meta"]["best"]["Streaming MuLoCo"]
    hp = Hyper(**best)
    points = [(label(tau, eager, tuned), args.k, seed) for seed in map(int, args.seeds.split(","))
              for tau, eager, tuned in rows()]
    if args.tune:
        points = [(tune_label(lr, mu), args.k, 1) for lr, mu in TUNE]

    def run(name: str, k: int, seed: int, splits: TokenSplits) -> dict:
        cfg = METHODS[name][1]
        row = run_one(name, k, Hyper(hp.inner_mult, cfg["outer_lr"]) if "outer_lr" in cfg else hp, s, splits, seed)
        row.update(tau=cfg["sync_delay"], eager=cfg["eager_updates"], tune=args.tune, settings=s.__dict__,
                   config=cfg)
        return row

    jsonl_grid.run_grid(args.out, points, args.shard, s.block, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
