"""The fused CPU kernels of `csrc/` (statistical encode, block table decode, sparse top-k), built once
per machine.

Why a C file through ctypes rather than `torch.utils.cpp_extension`: the kernels use no torch
API, so they build with the system C compiler in well under a second (a torch extension spends
a minute compiling torch's headers), and a ctypes call releases the GIL, so the background
compression worker and the training thread really run at once. The build is cached under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`), named by a hash of the source and
flags; concurrent ranks build into temporary files and rename, so none sees a partial library.

Without a C compiler (or with STREAMING_MULOCO_NATIVE=0) the quantizer keeps its torch-ops
path, about half as fast on CPU; one log line says so. Other devices always use torch ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("streaming_muloco")

ENV = "STREAMING_MULOCO_NATIVE"  # "0": use the torch-ops path everywhere
SOURCE = Path(__file__).with_name("csrc") / "block_codes.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-strict-aliasing")
THREADED_MIN = 1 << 18  # elements: below this one thread is faster than handing out work

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None  # why the build failed (then not retried in this process)
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def enabled() -> bool:
    """Whether the kernels may be used (read on every call, so tests can switch paths)."""
    return os.environ.get(ENV, "1") != "0"


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(root) / "streaming_muloco_native"


def build(out_dir: Path, cc: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """Compile (or reuse) the kernels in `out_dir`; (library, "") or (None, why not)."""
    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not found)"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((cc, *FLAGS, platform.machine())).encode()).hexdigest()[:16]
    lib_path = out_dir / f"block_codes_{key}.so"
    if not lib_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                               timeout=120)
            if r.returncode:
                return None, f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
            os.replace(tmp, lib_path)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{cc} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        return None, f"cannot load {lib_path}: {e}"
    i64, vp, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.sm_stat_quantize.argtypes = [vp, i64, i64, c_int, c_float, i64, i64, vp, vp]
    lib.sm_stat_quantize.restype = None
    lib.sm_block_lut_decode.argtypes = [vp, vp, i64, i64, c_int, i64, i64, vp]
    lib.sm_block_lut_decode.restype = None
    lib.sm_sparse_select.argtypes = [vp, i64, i64, i64, i64, i64, i64, vp, vp, vp]
    lib.sm_sparse_select.restype = None
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when unavailable or disabled."""
    global _lib, _failed
    if not enabled():
        return None
    if _lib is None and _failed is None:
        with _lock:
            if _lib is None and _failed is None:
                _lib, why = build(build_dir())
                if _lib is None:
                    _failed = why
                    log.warning("streaming_muloco: fused CPU quantizer kernels unavailable (%s); using torch ops, "
                                "about half as fast. Install a C compiler (or set CC) to get them.", why)
    return _lib


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: all tensors contiguous on the CPU, and the library loads."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and library() is not None


def _run(fn, nblocks: int, numel: int, head: tuple, tail: tuple) -> None:
    """fn(*head, b0, b1, *tail) over block ranges [b0, b1), split across torch's intra-op
    thread count (each call writes only its own blocks' codes, meta and output)."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    if threads <= 1 or numel < THREADED_MIN or nblocks < 2:
        fn(*head, 0, nblocks, *tail)
        return
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="sm-native"), threads
        pool = _pool
    step = -(-nblocks // threads)
    futures = [pool.submit(fn, *head, b0, min(nblocks, b0 + step), *tail) for b0 in range(0, nblocks, step)]
    for f in futures:
        f.result()


def stat_quantize(x: torch.Tensor, block: int, bits: int, clip: float, codes: torch.Tensor,
                  meta: torch.Tensor) -> None:
    """codes (packed uint8) and meta (fp32, (blocks, 2**bits) bin means) of flat fp32 `x`.

    `block` must be a multiple of 8 // bits, so no two blocks share a byte of codes.
    """
    lib = library()
    n, per = x.numel(), 8 // bits
    nb = -(-n // block)
    if lib is None or block % per or x.dtype != torch.float32 or codes.dtype != torch.uint8 \
            or meta.dtype != torch.float32 or codes.numel() < -(-n // per) or meta.numel() < nb << bits:
        raise ValueError(f"stat_quantize: bad arguments (n={n}, block={block}, bits={bits}, codes {codes.dtype} "
                         f"x{codes.numel()}, meta {meta.dtype} x{meta.numel()})")
    _run(lib.sm_stat_quantize, nb, n, (x.data_ptr(), n, block, bits, clip), (codes.data_ptr(), meta.data_ptr()))


def lut_decode(codes: torch.Tensor, tables: torch.Tensor, block: int, bits: int, out: torch.Tensor) -> None:
    """out[i] = tables[block of i, code i] for the packed codes of out.numel() elements."""
    lib = library()
    n = out.numel()
    nb = -(-n // block)
    if lib is None or out.dtype != torch.float32 or tables.dtype != torch.float32 or codes.dtype != torch.uint8 \
            or codes.numel() < -(-n // (8 // bits)) or tables.numel() < nb << bits:
        raise ValueError(f"lut_decode: bad arguments (n={n}, block={block}, bits={bits})")
    _run(lib.sm_block_lut_decode, nb, n, (codes.data_ptr(), tables.data_ptr(), n, block, bits), (out.data_ptr(),))


def sparse_select(x: torch.Tensor, block: int, kf: int, kt: int, idx: torch.Tensor, codes: torch.Tensor,
                  levels: torch.Tensor) -> None:
    """Per chunk of `block` elements of flat fp32 `x` (the tail keeps kt, full chunks kf): the
    chunk-local indices of the kept values in ascending order (int64), their unpacked 2-bit codes
    (uint8) and the chunk's [low, high] magnitude levels (fp32), as `sparse.py` lays them out."""
    lib = library()
    n = x.numel()
    nf, r = divmod(n, block)
    nb, kk = nf + (1 if r else 0), nf * kf + (kt if r else 0)
    if lib is None or x.dtype != torch.float32 or idx.dtype != torch.int64 or codes.dtype != torch.uint8 \
            or levels.dtype != torch.float32 or idx.numel() < kk or codes.numel() < kk or levels.numel() < 2 * nb \
            or not 0 < kf <= block or (r and not 0 < kt <= r):
        raise ValueError(f"sparse_select: bad arguments (n={n}, block={block}, kf={kf}, kt={kt})")
    _run(lib.sm_sparse_select, nb, n, (x.data_ptr(), n, block, kf, kt),
         (idx.data_ptr(), codes.data_ptr(), levels.data_ptr()))
