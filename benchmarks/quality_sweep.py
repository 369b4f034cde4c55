"""Quality at equal tokens (docs/design.md §8): DP-AdamW, DP-Muon, DiLoCo, MuLoCo, Streaming MuLoCo and
MuLoCo with 4-/2-bit error-feedback compression, for K replicas in {1, 2, 4, 8}.

Every run uses the single-process simulator (streaming_muloco/sim/), which calls the
distributed path's own outer loop and is pinned to real DeepSpeed runs by tests/test_simulator.py.
- Equal tokens: a global batch of G sequences per step is split across the K workers (micro
  batch G/K), so every method and every K sees G*block tokens per step. DP runs over K ranks.
- Base settings come from ds_configs/*.json (the shipped file of each method); the sweep only
  sets K, H, the micro batch, and the tuned learning rates.
- `--tune`: on K=2 only, inner lr x {0.5, 1, 2} (Muon: muon_lr and adam_lr together) and, for
  outer methods, outer lr in {0.5, 0.8}; the best final eval loss per method is then used for
  every K. The compressed variants inherit MuLoCo's choice.
- Eval: the same fixed set for every run (eval_total batches of the eval stream), scored on the
  replicas' local models as train.py does.

    python benchmarks/quality_sweep.py --quick                            # ~1-3 min
    nice -n 10 python benchmarks/quality_sweep.py --tune \\
        --json benchmarks/results/quality.json --plot benchmarks/results/quality.png   # ~1 h, 2 vCPU
    # more rows later, with the learning rates tuned above:
    python benchmarks/quality_sweep.py --methods "MuLoCo 4-bit EF,MuLoCo 2-bit EF" \\
        --best-from benchmarks/results/quality.json --json more.json
    # a wider grid for some methods (--inner-mults / --outer-lrs), or the 2-bit study rows
    # (STUDY below: EF beta 0.9, as MuLoCo's code, linear 2-bit, block 64, no EF), named with --methods.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streaming_muloco.comm.base import wire_bytes
from streaming_muloco.data import TokenSplits, load_tokens
from streaming_muloco.sim import simulate

REPO = Path(__file__).resolve().parents[1]
COMPRESSED = {"MuLoCo 4-bit EF": 4, "MuLoCo 2-bit EF": 2}
# method -> (shipped config, extra streaming_muloco keys)
METHODS: dict[str, tuple[str, dict]] = {
    "DP-AdamW": ("dp_adamw_cpu.json", {}),
    "DP-Muon": ("dp_muon_cpu.json", {}),
    "DiLoCo": ("diloco_cpu.json", {}),
    "MuLoCo": ("muloco_cpu.json", {}),
    "Streaming MuLoCo": ("streaming_muloco_cpu.json", {"num_fragments": 2, "sync_delay": 1}),
    **{name: ("muloco_cpu.json", {"compression": {"method": "statistical", "bits": bits, "error_feedback": True}})
       for name, bits in COMPRESSED.items()},
}
# 2-bit variants for the error-feedback study: only run when named with --methods. Each changes
# one thing against "MuLoCo 2-bit EF" (statistical, block 256, beta 1).
STUDY: dict[str, tuple[str, dict]] = {
    "MuLoCo 2-bit EF beta 0.9": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "ef_beta": 0.9}}),
    "MuLoCo 2-bit linear EF": ("muloco_cpu.json", {"compression": {
        "method": "linear", "bits": 2, "error_feedback": True}}),
    "MuLoCo 2-bit EF block 64": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "block_size": 64}}),
    "MuLoCo 2-bit EF beta 0.9 eta-scaled": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "ef_beta": 0.9, "ef_scale_by_outer_lr": True}}),
    "MuLoCo 2-bit no EF": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": False}}),
}
# Parameter-aware rows (segments.py): per-row blocks, 1-D parameters in fp32.
_ROW = {"granularity": "row"}
STUDY.update({
    "MuLoCo 2-bit EF row": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, **_ROW}}),
    "MuLoCo 2-bit linear EF row": ("muloco_cpu.json", {"compression": {
        "method": "linear", "bits": 2, "error_feedback": True, **_ROW}}),
    "MuLoCo 2-bit no EF row": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": False, **_ROW}}),
    "MuLoCo 2-bit EF beta 0.9 row": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "ef_beta": 0.9, **_ROW}}),
    "MuLoCo 2-bit linear EF beta 0.9 row": ("muloco_cpu.json", {"compression": {
        "method": "linear", "bits": 2, "error_feedback": True, "ef_beta": 0.9, **_ROW}}),
    "MuLoCo 2-bit EF block-in-param": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "granularity": "block"}}),
    **{f"MuLoCo 2-bit EF row clip {c:g}": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 2, "error_feedback": True, "stat_clip": c, **_ROW}}) for c in (1.5, 2, 3)},
    "MuLoCo 4-bit EF row": ("muloco_cpu.json", {"compression": {
        "method": "statistical", "bits": 4, "error_feedback": True, **_ROW}}),
})



def _shipped(file: str, outer: bool = False) -> dict:
    """The compression section of a shipped config (with `outer`, its outer-optimizer keys too),
    so the sweep measures what users get."""
    section = json.loads((REPO / "ds_configs" / file).read_text())["streaming_muloco"]
    keys = ("compression", "outer_lr", "outer_momentum", "outer_nesterov") if outer else ("compression",)
    return {k: section[k] for k in keys if k in section}


STUDY.update({
    "MuLoCo 4-bit shipped": ("muloco_cpu.json", _shipped("muloco_4bit_cpu.json")),
    "MuLoCo 2-bit shipped": ("muloco_cpu.json", _shipped("muloco_2bit_ef_cpu.json")),
    "MuLoCo sparse shipped": ("muloco_cpu.json", _shipped("muloco_sparse_cpu.json", outer=True)),
    "DiLoCo 2-bit shipped": ("diloco_cpu.json", _shipped("muloco_2bit_ef_cpu.json")),
    # SparseLoCo as its paper ran it: AdamW inner steps, the sparse config's compression and outer step
    "DiLoCo sparse shipped": ("diloco_cpu.json", _shipped("muloco_sparse_cpu.json", outer=True)),
})
METHODS.update(STUDY)
TUNE_WITH_MULOCO = set(COMPRESSED) | set(STUDY)  # compressed rows inherit MuLoCo's rates unless tuned
INNER_MULTS, OUTER_LRS = (0.5, 1.0, 2.0), (0.5, 0.8)


@dataclass(frozen=True)
class Settings:
    """One sweep's scale; `full` must fit in about an hour on 2 shared vCPUs."""

    steps: int
    sync_every: int
    global_batch: int
    block: int
    eval_every: int
    eval_total: int  # eval batches in all, split over the K replicas (so divisible by every K)
    eval_micro: int
    ks: tuple[int, ...]
    model: str = "tiny"  # a `model.py` preset


FULL = Settings(steps=480, sync_every=30, global_batch=32, block=64, eval_every=60, eval_total=32, eval_micro=16,
                ks=(1, 2, 4, 8))
QUICK = Settings(steps=120, sync_every=20, global_batch=16, block=64, eval_every=40, eval_total=16, eval_micro=8,
                 ks=(1, 4))


@dataclass(frozen=True)
class Hyper:
    inner_mult: float = 1.0
    outer_lr: float | None = None  # None: the config's


def is_outer(method: str) -> bool:
    return not method.startswith("DP-")


def build_config(method: str, K: int, hp: Hyper, s: Settings) -> dict:
    """The method's shipped DeepSpeed JSON with this sweep's K, H, batch split and learning rates."""
    file, extra = METHODS[method]
    cfg = json.loads((REPO / "ds_configs" / file).read_text())
    if s.global_batch % K:
        raise ValueError(f"global batch {s.global_batch} does not split across K={K} workers")
    cfg["train_micro_batch_size_per_gpu"] = s.global_batch // K
    opt = cfg["optimizer"]["params"]
    for key in ("lr", "muon_lr", "adam_lr"):
        if key in opt:
            opt[key] *= hp.inner_mult
    if is_outer(method):
        section = cfg["streaming_muloco"]
        section.update({"num_replicas": K, "sync_every": s.sync_every, **extra})
        if hp.outer_lr is not None:
            section["outer_lr"] = hp.outer_lr
    return cfg


def run_one(method: str, K: int, hp: Hyper, s: Settings, splits: TokenSplits, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = simulate(build_config(method, K, hp, s), steps=s.steps, model=s.model, block_size=s.block, seed=seed,
                   micro_batch=s.global_batch // K, eval_every=s.eval_every, eval_batches=s.eval_total // K,
                   eval_micro_batch=s.eval_micro, splits=splits, dp_world=K, log_every=s.eval_every)
    row = {"method": method, "K": K, **dataclasses.asdict(hp), "final_eval_loss": res["final_eval_loss"],
           "diverged": res["diverged"], "tokens": res["tokens"], "outer_steps": res["outer_steps"][0],
           "bytes_sent_per_replica": res["bytes_sent_per_replica"][0],
           "bytes_source": "counted" if is_outer(method) else "DDP ring all-reduce model",
           "eval_curve": [(step, step * res["tokens_per_step"], loss) for step, loss in res["eval_loss"]],
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"  {method:<18} K={K} inner x{hp.inner_mult:<4g} outer_lr={hp.outer_lr!s:<5} -> eval "
          f"{row['final_eval_loss']:.4f}  {row['bytes_sent_per_replica'] / 1e6:8.2f} MB/replica  "
          f"{row['seconds']:.0f}s", flush=True)
    return row


def compression_check(bits: int) -> tuple[bool, str]:
    """Does PseudoGradExchange put fewer bytes on the wire than fp32 for this setting?

    The config keys parse whether or not the exchange implements them, so a run could silently
    be uncompressed; this probe launches one real exchange between two in-process replicas.
    """
    try:
        from streaming_muloco.collectives import PseudoGradExchange
        from streaming_muloco.config import parse_section
        from streaming_muloco.sim.inprocess import InProcessBackend, InProcessGroup

        cfg = parse_section({"num_replicas": 2, **METHODS["MuLoCo 4-bit EF"][1]}).compression
        cfg = dataclasses.replace(cfg, bits=bits)
        group = InProcessGroup(2)
        comms = [InProcessBackend(group, r) for r in range(2)]
        exchanges = [PseudoGradExchange(cfg, c, num_fragments=1) for c in comms]
        n = 1 << 14
        handles = [ex.send(0, ex.encode(0, torch.randn(n, generator=torch.Generator().manual_seed(r))))
                   for r, ex in enumerate(exchanges)]
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"; the reason is reported
        return False, f"probe failed: {type(e).__name__}: {e}"
    fp32 = wire_bytes("all_reduce", 4 * n, 2)
    if comms[0].bytes_sent >= fp32:
        return False, (f"PseudoGradExchange sent {comms[0].bytes_sent} B for {n} floats (fp32: {fp32} B): "
                       f"not compressing")
    return True, f"{comms[0].bytes_sent} B on the wire for {n} floats (fp32 all-reduce: {fp32} B)"


def tune(methods: list[str], s: Settings, splits: TokenSplits, seed: int, inner_mults: tuple[float, ...] = INNER_MULTS,
         outer_lrs: tuple[float, ...] = OUTER_LRS, tune_compressed: bool = False) -> tuple[dict[str, Hyper], list[dict]]:
    """Grid on K=2; the best final eval loss per method (compressed variants follow MuLoCo
    unless `tune_compressed`)."""
    print("== tuning on K=2", flush=True)
    rows, best = [], {}
    for method in [m for m in methods if tune_compressed or m not in TUNE_WITH_MULOCO]:
        grid = [Hyper(m, o) for m in inner_mults for o in (outer_lrs if is_outer(method) else (None,))]
        results = [run_one(method, 2, hp, s, splits, seed) for hp in grid]
        rows += results
        scores = [r["final_eval_loss"] if math.isfinite(r["final_eval_loss"]) else math.inf for r in results]
        best[method] = grid[scores.index(min(scores))]
    if "MuLoCo" in best:
        for method in TUNE_WITH_MULOCO:
            best.setdefault(method, best["MuLoCo"])
    return best, rows


def markdown(results: list[dict], methods: list[str], ks: tuple[int, ...], best: dict[str, Hyper]) -> str:
    by = {(r["method"], r["K"]): r for r in results}
    head = "| method | inner lr x | outer lr | " + " | ".join(f"K={k}" for k in ks) + " | " + \
        " | ".join(f"MB/replica K={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(ks))]
    for m in methods:
        hp = best.get(m, Hyper())
        loss = [f"{by[m, k]['final_eval_loss']:.4f}" if (m, k) in by else "-" for k in ks]
        mb = [f"{by[m, k]['bytes_sent_per_replica'] / 1e6:.2f}" if (m, k) in by else "-" for k in ks]
        outer = "-" if not is_outer(m) else (f"{hp.outer_lr:g}" if hp.outer_lr is not None else "config")
        lines.append(f"| {m} | {hp.inner_mult:g} | {outer} | " + " | ".join(loss) + " | " + " | ".join(mb) + " |")
    return "\n".join(lines)


def plot(results: list[dict], ks: tuple[int, ...], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot"
    fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for r in (r for r in results if r["K"] == k):
            curve = [(tok, loss) for _, tok, loss in r["eval_curve"] if math.isfinite(loss)]
            if curve:
                ax.plot(*zip(*curve), marker=".", label=r["method"])
        ax.set_title(f"K={k}")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval loss")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small scale, K in {1, 4}: a few minutes")
    ap.add_argument("--tune", action="store_true", help="learning-rate grid on K=2 first, best per method after")
    ap.add_argument("--ks", type=lambda v: tuple(int(k) for k in v.split(",")), help="e.g. 1,2,4,8")
    ap.add_argument("--steps", type=int, help="override the inner steps")
    ap.add_argument("--compression", choices=("auto", "on", "off"), default="auto",
                    help="MuLoCo 4/2-bit EF rows: auto = only if PseudoGradExchange really compresses")
    ap.add_argument("--methods", type=lambda v: [m.strip() for m in v.split(",")],
                    help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--best-from", help="take the tuned learning rates from an earlier --json result")
    floats = lambda v: tuple(float(x) for x in v.split(","))  # noqa: E731
    ap.add_argument("--inner-mults", type=floats, default=INNER_MULTS, help="--tune grid of inner lr multipliers")
    ap.add_argument("--outer-lrs", type=floats, default=OUTER_LRS, help="--tune grid of outer learning rates")
    ap.add_argument("--tune-compressed", action="store_true",
                    help="--tune the compressed rows too (default: they take MuLoCo's rates)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", help="write meta, tuning and results here")
    ap.add_argument("--plot", help="PNG of eval loss vs tokens, one panel per K")
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    s = dataclasses.replace(s, ks=args.ks or s.ks, steps=args.steps or s.steps)
    for k in s.ks:
        if s.global_batch % k or s.eval_total % k:
            ap.error(f"K={k} must divide the global batch ({s.global_batch}) and eval batches ({s.eval_total})")
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    methods = [m for m in METHODS if m not in COMPRESSED and m not in STUDY]
    checks = {bits: compression_check(bits) for bits in COMPRESSED.values()}
    for name, bits in COMPRESSED.items():
        ok, why = checks[bits]
        print(f"compression {bits}-bit: {'supported' if ok else 'NOT supported'} ({why})", flush=True)
        if args.compression == "on" or (args.compression == "auto" and ok):
            methods.append(name)

    if args.methods:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        methods = [m for m in methods + list(STUDY) if m in args.methods]
    tokens = load_tokens(None)
    splits = TokenSplits.from_tokens(tokens, 0.05, s.block)
    best: dict[str, Hyper] = {m: Hyper() for m in methods}
    if args.best_from:
        earlier = json.loads(Path(args.best_from).read_text())["meta"]["best"]
        best.update({m: Hyper(**earlier[m]) for m in methods if m in earlier})
        best.update({m: Hyper(**earlier["MuLoCo"]) for m in methods if m in STUDY and m not in earlier
                     and "MuLoCo" in earlier})
    tuning: list[dict] = []
    if args.tune:
        tuned, tuning = tune(methods, s, splits, args.seed, args.inner_mults, args.outer_lrs, args.tune_compressed)
        best.update({m: hp for m, hp in tuned.items() if m in methods})
    reuse = {(r["method"], r["K"], r["inner_mult"], r["outer_lr"]): r for r in tuning}
    print("== sweep", flush=True)
    results = []
    for k in s.ks:
        for m in methods:
            hp = best[m]
            results.append(reuse.get((m, k, hp.inner_mult, hp.outer_lr)) or run_one(m, k, hp, s, splits, args.seed))

    table = markdown(results, methods, s.ks, best)
    print("\n" + table + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "command": " ".join(["python"] + sys.argv), "machine": "2 vCPU CPU (shared), torch CPU, 1 thread",
            "settings": dataclasses.asdict(s), "seed": args.seed, "model": "tiny (2 layers, n_embd 64)",
            "compression_check": {str(b): why for b, (_, why) in checks.items()},
            "best": {m: dataclasses.asdict(hp) for m, hp in best.items()},
            "grid": {"inner_mults": args.inner_mults, "outer_lrs": args.outer_lrs} if args.tune else None,
            "seconds": round(time.perf_counter() - t_start, 1)}
    if args.plot:
        print(plot(results, s.ks, args.plot))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "tuning": tuning, "results": results,
                                               "table_markdown": table}, indent=1))
        print(f"results written to {args.json}")
    print(f"total {meta['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
