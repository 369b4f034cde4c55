"""Compression kernel throughput as a ratio to a plain tensor copy (docs/design.md §8, "Kernels").

    /tmp/venv/bin/python benchmarks/bench_compression.py --quick
    /tmp/venv/bin/python benchmarks/bench_compression.py --json benchmarks/results/compression.json
    /tmp/venv/bin/python benchmarks/bench_compression.py --full     # adds 64M elements

For each method and size it times compress (quantize + pack) and decompress (unpack +
dequantize) of an fp32 tensor and reports GB/s of fp32 input processed, divided by the GB/s of
`torch.clone` of the same tensor measured in the same run. Medians over reps; 2 threads, as on
the 2-vCPU machines of docs/design.md §8. Two "naive" rows time the straightforward versions docs/design.md §8
measured (int8 absmax 0.32x, 2-bit min/max + pack 0.22x at 16M) the same way, as the reference
to beat. The compressors' scratch buffers are warm, as they are from the second outer round on.
Note that clone of 16M floats (64 MB) pays fresh-page faults on every call, smaller clones reuse
freed heap memory: compare rows of one size, not across sizes.

Each operation split over 2 threads waits for both, so on a machine shared with other jobs the
wall-clock ratios fall apart (a parallel op can cost a whole scheduler slice); the header prints
the load average. `--threads 1 --timer cpu` measures the work itself and is stable under load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_muloco import native  # noqa: E402
from streaming_muloco.compressors import make_compressor  # noqa: E402

METHODS: list[tuple[str, int]] = [("linear", 8), ("linear", 4), ("linear", 2), ("statistical", 2),
                                  ("statistical", 4), ("e3m0", 4), ("topk", 32), ("sparse", 2)]
# also timed on the torch-ops path (STREAMING_MULOCO_NATIVE=0), side by side with the fused kernels
TORCH_PATH: list[tuple[str, int]] = [("statistical", 2), ("statistical", 4)]
SPARSE_BLOCK = 4096  # "sparse" runs at its own chunk length (--sparse-block-size): see streaming_muloco/sparse.py


def naive_int8_absmax(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward version docs/design.md §8 timed (0.32x clone): the reference to beat."""
    v = x.view(-1, block)
    scale = v.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(v / scale).to(torch.int8), scale


def naive_int8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale).view(-1)


def naive_linear2(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straightforward 2-bit min/max + pack (docs/design.md §8: 0.22x clone)."""
    v = x.view(-1, block)
    lo, hi = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    scale = (hi - lo) / 3
    q = torch.round((v - lo) / scale).clamp(0, 3).to(torch.uint8).view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6), lo, scale


def naive_linear2_decode(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    q = ((packed.unsqueeze(1) >> shifts) & 3).view(lo.shape[0], -1)
    return (q.float() * scale + lo).view(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], reps: int, device: torch.device, clock: Callable[[], float]) -> float:
    fn()  # warm-up: scratch buffers, lookup tables
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def run(sizes: list[int], reps: int, block_size: int, topk_fraction: float, device: torch.device,
        clock: Callable[[], float], sparse_block: int = SPARSE_BLOCK) -> list[dict[str, float | int | str]]:
    rows: list[dict[str, float | int | str]] = []
    for n in sizes:
        x = torch.randn(n, device=device)
        gb = n * 4 / 1e9
        clone_s = median_seconds(lambda: x.clone(), reps, device, clock)
        variants = [(m, b, True) for m, b in METHODS] + [(m, b, False) for m, b in TORCH_PATH]
        for method, bits, fused in variants:
            os.environ[native.ENV] = "1" if fused else "0"
            block = sparse_block if method == "sparse" else block_size
            comp = make_compressor(method, bits if method != "topk" else 8, block, topk_fraction)
            name = f"{comp.name} B{block}" if method == "sparse" else comp.name
            if method == "statistical":
                name += " (fused C)" if fused and native.usable(x) else " (torch ops)"
            p = comp.compress(x)
            c_s = median_seconds(lambda: comp.compress(x), reps, device, clock)
            d_s = median_seconds(lambda: comp.decompress(p), reps, device, clock)
            rows.append({"method": name, "numel": n, "ratio": n * 4 / p.nbytes,
                         "clone_GBps": gb / clone_s, "compress_GBps": gb / c_s, "decompress_GBps": gb / d_s,
                         "compress_x_clone": clone_s / c_s, "decompress_x_clone": clone_s / d_s})
            comp.release_scratch()
        os.environ.pop(native.ENV, None)
        if n % (4 * block_size) == 0:  # the naive references, timed the same way
            naive = (("naive int8 absmax", naive_int8_absmax, naive_int8_decode, 8 + 32 / block_size),
                     ("naive linear2", naive_linear2, naive_linear2_decode, 2 + 64 / block_size))
            for name, enc, dec, wire in naive:
                parts = enc(x, block_size)
                c_s = median_seconds(lambda: enc(x, block_size), reps, device, clock)
                d_s = median_seconds(lambda: dec(*parts), reps, device, clock)
                rows.append({"method": name, "numel": n, "ratio": 32 / wire, "clone_GBps": gb / clone_s,
                             "compress_GBps": gb / c_s, "decompress_GBps": gb / d_s,
                             "compress_x_clone": clone_s / c_s, "decompress_x_clone": clone_s / d_s})
        del x
    return rows


def markdown(rows: list[dict[str, float | int | str]]) -> str:
    out = ["| method | numel | size ratio | clone GB/s | compress GB/s | × clone | decompress GB/s | × clone |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['method']} | {int(r['numel']) // 2**20}M | {r['ratio']:.1f}x | {r['clone_GBps']:.2f} | "
                   f"{r['compress_GBps']:.2f} | {r['compress_x_clone']:.2f} | {r['decompress_GBps']:.2f} | "
                   f"{r['decompress_x_clone']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M and 4M elements, 3 reps")
    ap.add_argument("--full", action="store_true", help="also 64M elements")
    ap.add_argument("--reps", type=int, default=0, help="timed reps per point (default 7, 3 with --quick)")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--topk-fraction", type=float, default=0.01)
    ap.add_argument("--sparse-block-size", type=int, default=SPARSE_BLOCK, help="chunk length of method 'sparse'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or process CPU time: steadier on a shared machine (use --threads 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.timer == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [2**20, 2**22] if args.quick else [2**20, 2**22, 2**24] + ([2**26] if args.full else [])
    reps = args.reps or (3 if args.quick else 7)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = run(sizes, reps, args.block_size, args.topk_fraction, torch.device(args.device), clock,
               args.sparse_block_size)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, block {args.block_size}, "
          f"topk fraction {args.topk_fraction}, median of {reps}, {args.timer} time, "
          f"1-min load average at start {load:.2f}")
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": args.threads, "device": args.device, "reps": reps,
                                         "timer": args.timer, "load_average": load,
                                         "block_size": args.block_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
