"""The compressor factory: a `CompressionConfig`'s method name -> its `Compressor`.

It is the one module that knows every method, so it sits above both `compression.py` (the base
and the non-block methods) and `quantizers.py` (the block quantizers, which build on the base):
neither of those imports this module or the other's compressors, and the import graph has no
cycle.
"""
from __future__ import annotations

import torch

from .compression import METHODS, META_DTYPES, Compressor, IdentityCompressor, TopKCompressor
from .quantizers import E3M0Quantizer, LinearQuantizer, StatisticalQuantizer
from .sparse import SparseQuantizer

__all__ = ["make_compressor"]


def make_compressor(method: str, bits: int = 8, block_size: int = 256, topk_fraction: float = 0.01,
                    *, stat_clip: float = 6.0, meta_dtype: torch.dtype = torch.bfloat16) -> Compressor:
    """Build the compressor named by `CompressionConfig` (method, bits, block_size, topk_fraction).

    Args:
        method: one of METHODS.
        bits: 2, 4 or 8 for "linear" and "statistical"; 4 for "e3m0"; 2 for "sparse"; ignored for
            "none"/"topk".
        block_size: elements per block (one set of metadata each) for the block quantizers; the
            chunk length of "sparse" (4096 suits it: see `sparse.py`).
        topk_fraction: share of elements "topk" sends, and of each chunk "sparse" sends, in (0, 1].
        stat_clip: "statistical" bins span mean ± stat_clip·σ (the MuLoCo code uses 6).
        meta_dtype: dtype of per-block metadata: bfloat16 (default; fp32 range), float16 (finer,
            but |values| must stay below 65504) or float32.
    """
    if method == "none":
        return IdentityCompressor()
    if method == "topk":
        return TopKCompressor(topk_fraction)
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype ({meta_dtype}) must be torch.bfloat16, torch.float16 or torch.float32")
    if method == "linear":
        return LinearQuantizer(bits, block_size, meta_dtype)
    if method == "statistical":
        return StatisticalQuantizer(bits, block_size, stat_clip, meta_dtype)
    if method == "e3m0":
        if bits != 4:
            raise ValueError(f"bits ({bits}) must be 4 for method 'e3m0' (1 sign + 3 exponent bits)")
        return E3M0Quantizer(block_size, meta_dtype)
    if method == "sparse":
        return SparseQuantizer(block_size, topk_fraction, meta_dtype, bits=bits)
    raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
