"""Grids of independent simulator runs kept in a JSONL file (long_horizon.py, eager_quality.py,
sparse_search.py): each finished run is appended at once, a rerun skips the points already
there, and `--shard i/n` lets several processes share one grid side by side.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from streaming_muloco.data import TokenSplits, load_tokens

Point = tuple[str, int, int]  # (row label, K, seed)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """--out, --shard and --report, the same for every grid."""
    ap.add_argument("--out", required=True, help="JSONL file: one finished run per line")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th grid point from the i-th")
    ap.add_argument("--report", action="store_true", help="print the table of what --out holds")


def load_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def run_grid(path: str | Path, points: list[Point], shard: str, block: int,
             run: Callable[[str, int, int, TokenSplits], dict]) -> None:
    """Run this shard's points that `path` lacks; `run(label, K, seed, splits)` returns the row,
    to which the label and seed are added before it is appended."""
    i, n = (int(v) for v in shard.split("/"))
    have = {(r["label"], r["K"], r["seed"]) for r in load_rows(path)}
    splits = None
    for j, (label, k, seed) in enumerate(points):
        if j % n != i or (label, k, seed) in have:
            continue
        if splits is None:
            splits = TokenSplits.from_tokens(load_tokens(None), 0.05, block)
        row = run(label, k, seed, splits)
        row.update(label=label, seed=seed)
        with Path(path).open("a") as f:
            f.write(json.dumps(row) + "\n")
