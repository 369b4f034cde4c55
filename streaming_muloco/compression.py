"""Pseudo-gradient compression: the wire format and the compressor API (docs/design.md §5).

    from streaming_muloco.compressors import make_compressor
    comp = make_compressor("linear", bits=2, block_size=256, topk_fraction=0.01)
    payload = comp.compress(delta)                  # delta: flat fp32, any device
    buf = payload.to_flat_bytes()                   # ONE uint8 buffer per rank ...
    assert buf.numel() == comp.payload_nbytes(delta.numel())   # ... whose size every rank knows
    delta_hat = comp.decompress(comp.unflatten(buf, delta.numel()))

Methods and what one element costs on the wire (B = block_size, meta 2 bytes in bf16):
- "none":        the fp32 values (uncompressed baselines), 32 bits.
- "linear":      min/max uniform codes per block, bits + 32/B bits.
- "statistical": mean ± clip·σ bins, each decoded as the mean of its values (MuLoCo's default),
                 bits + 2**bits·16/B bits.
- "e3m0":        4-bit sign+exponent floats with an absmax scale per block, 4 + 16/B bits.
- "topk":        the k = max(1, ceil(fraction·numel)) largest |x| as fp32 values plus int32
                 indices, 64·k/numel bits.

This module is the base: the `Payload`, the `Compressor` base class (which owns the input
checks, payload allocation and empty case of every method), bit packing, the two non-block
methods and the non-finite check. It imports no other compressor module: the block quantizers
build on it in `quantizers.py`, and the factory `make_compressor`, the one place that knows
every method, lives in `compressors.py`.

Design choices that matter for the wire:
- A payload's size is a function of (numel, config) only, so every rank of a collective knows
  how many bytes it will receive without an extra exchange.
- A payload is ONE contiguous uint8 buffer; its tensors are views into it, ordered by element
  size (largest first) so every view is aligned and `to_flat_bytes()` costs no copy.
- Rounding is to nearest, never stochastic, and decoding a payload is deterministic, so every
  rank that receives it gets bit-identical values (on CUDA the statistical bin means are summed
  in an order the device picks (atomics for 8 bits, `embedding_bag` for 2 and 4): the payload
  may differ in the last bits from run to run, but all ranks decode the one that was sent).
- All math stays on the input's device and is vectorised, in chunks of at most CPU_CHUNK (CPU) or
  DEVICE_CHUNK elements. Temporaries live in scratch buffers a compressor keeps and reuses
  across calls (on CPU, page faults of fresh allocations cost more than the math): at most ~14
  bytes per element of one chunk (~7 MiB on CPU), freed by `release_scratch()`. A compressor
  is therefore not thread-safe: use one per thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "METHODS", "META_DTYPES", "Compressor", "Payload", "IdentityCompressor", "TopKCompressor",
    "pack_bits", "unpack_bits", "has_nonfinite", "layout_nbytes", "kept_count",
]

METHODS = ("none", "linear", "statistical", "e3m0", "topk", "sparse")
META_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU_CHUNK = 2**19  # elements per cache-sized chunk of elementwise work on CPU (2 MiB of fp32)
DEVICE_CHUNK = 2**24  # elsewhere: few launches, and scratch bounded at ~14 bytes × 16M
Layout = tuple[tuple[str, torch.dtype, int], ...]  # (field, dtype, count), in wire order
Scratch = Callable[[str, int, torch.dtype], torch.Tensor]  # (key, numel, dtype) -> work tensor
_MAX_INT32 = 2**31 - 1


@dataclass(frozen=True, eq=False)
class Payload:
    """What one rank sends: packed codes, per-block metadata, top-k indices, plus a static header.

    `codes` is uint8 packed codes for the block quantizers, and the fp32 values for "none" and
    "topk". Empty tensors stand for absent parts, so every payload has the same three fields.
    """

    method: str
    numel: int
    bits: int
    block_size: int
    codes: torch.Tensor
    meta: torch.Tensor
    indices: torch.Tensor
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire: codes + metadata + indices."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.meta, self.indices))

    def to_flat_bytes(self) -> torch.Tensor:
        """The payload as one uint8 buffer (no copy when built by a compressor)."""
        if self.flat is not None:
            return self.flat
        parts = sorted((self.codes, self.meta, self.indices), key=lambda t: -t.element_size())
        return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in parts])

    @classmethod
    def from_flat_bytes(cls, buf: torch.Tensor, layout: Layout, *, method: str, numel: int,
                        bits: int, block_size: int) -> Payload:
        """Views into a received uint8 buffer laid out as `layout` (see `Compressor.layout`)."""
        need = layout_nbytes(layout)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != need:
            raise ValueError(f"payload buffer must be 1-D uint8 of {need} bytes for method '{method}' "
                             f"and numel {numel}; got {buf.dtype} of shape {tuple(buf.shape)}")
        parts: dict[str, torch.Tensor] = {}
        off = 0
        for name, dt, n in layout:
            size = n * _itemsize(dt)
            chunk = buf[off:off + size]
            if chunk.storage_offset() % _itemsize(dt) or chunk.data_ptr() % _itemsize(dt):
                chunk = chunk.clone()  # a slice of a gathered buffer may be misaligned for `dt`
            parts[name] = chunk.view(dt)
            off += size
        return cls(method, numel, bits, block_size, parts["codes"], parts["meta"], parts["indices"], buf)


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


def layout_nbytes(layout: Layout) -> int:
    """Bytes of a payload laid out as `layout`."""
    return sum(n * _itemsize(dt) for _, dt, n in layout)


def kept_count(fraction: float, numel: int) -> int:
    """Elements a top-k method keeps of `numel`: max(1, ceil(fraction·numel)), 0 for none; the
    1e-9 slack stops float noise (0.07·100 = 7.000000000000001) adding one."""
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def make_layout(codes: tuple[torch.dtype, int], meta: tuple[torch.dtype, int],
                indices: tuple[torch.dtype, int]) -> Layout:
    """Wire order: larger element sizes first, so every part starts aligned in a fresh buffer."""
    parts = [("codes", *codes), ("meta", *meta), ("indices", *indices)]
    return tuple(sorted(parts, key=lambda p: -_itemsize(p[1])))


class Compressor:
    """Base of all pseudo-gradient compressors: flat fp32 tensor <-> fixed-size `Payload`."""

    method: str = ""
    bits: int = 32
    block_size: int = 0

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def name(self) -> str:
        return f"{self.method}{self.bits}" if self.method in ("linear", "statistical") else self.method

    @property
    def alignment(self) -> int:
        """Elements: a cut at a multiple of this splits no block, so each piece of a vector cut
        there is encoded with the same per-block parameters as in the whole. 1 when there are no
        blocks; top-k's selection still depends on the whole piece, so its pieces are not exact."""
        return 1

    def layout(self, numel: int) -> Layout:
        raise NotImplementedError

    def compress(self, x: torch.Tensor) -> Payload:
        """The payload of flat `x`; checks, allocation and the empty case live here once, so a
        method only writes `_encode`."""
        x = as_flat_f32(x)
        p = self._alloc(x.numel(), x.device)
        if x.numel():
            self._encode(x, p)
        return p

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded fp32 values of `p`, written into `out` when given (checked to fit)."""
        self._check_payload(p)
        out = output_buffer(out, p.numel, p.codes.device)
        if p.numel:
            self._decode(p, out)
        return out

    def _encode(self, x: torch.Tensor, p: Payload) -> None:
        """Fill the freshly allocated `p` from `x` (flat contiguous fp32, not empty)."""
        raise NotImplementedError

    def _decode(self, p: Payload, out: torch.Tensor) -> None:
        """Write the p.numel (> 0) decoded values of the checked payload `p` into `out`."""
        raise NotImplementedError

    def payload_nbytes(self, numel: int) -> int:
        """Bytes of the payload of a `numel`-element tensor: known before compressing."""
        return layout_nbytes(self.layout(numel))

    def unflatten(self, buf: torch.Tensor, numel: int) -> Payload:
        """The payload in a received flat buffer (the inverse of `Payload.to_flat_bytes`)."""
        return Payload.from_flat_bytes(buf, self.layout(numel), method=self.method, numel=numel,
                                       bits=self.bits, block_size=self.block_size)

    def release_scratch(self) -> None:
        """Free the cached work buffers (they are re-allocated on the next call)."""
        self._scratch.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, bits={self.bits}, block_size={self.block_size})"

    # -- helpers shared by the implementations -------------------------------------------
    def _alloc(self, numel: int, device: torch.device) -> Payload:
        """An uninitialised payload whose parts are views of one fresh flat buffer."""
        layout = self.layout(numel)
        flat = torch.empty(layout_nbytes(layout), dtype=torch.uint8, device=device)
        return Payload.from_flat_bytes(flat, layout, method=self.method, numel=numel, bits=self.bits,
                                       block_size=self.block_size)

    def _work(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable scratch tensor of at least `numel` elements (contents undefined)."""
        buf = self._scratch.get((key, device, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[(key, device, dtype)] = buf
        return buf[:numel]

    def _scratch_fn(self, device: torch.device) -> Scratch:
        """`_work` on `device`, for the module-level packing helpers."""
        return lambda key, n, dtype: self._work(key, n, dtype, device)

    def _check_payload(self, p: Payload) -> None:
        if (p.method, p.bits, p.block_size) != (self.method, self.bits, self.block_size):
            raise ValueError(f"payload was made by method={p.method!r} bits={p.bits} block_size={p.block_size} "
                             f"but this compressor is {self!r}; every rank must use the same compression config")


def as_flat_f32(x: torch.Tensor) -> torch.Tensor:
    """The input as a contiguous 1-D fp32 tensor (a view when it already is one)."""
    if x.dim() != 1:
        raise ValueError(f"compress expects a flat 1-D tensor, got shape {tuple(x.shape)}; pass x.reshape(-1)")
    if not x.is_floating_point():
        raise ValueError(f"compress expects a floating-point tensor, got {x.dtype}")
    return x.to(torch.float32).contiguous()


def output_buffer(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """`out` checked to fit n decoded values, or a fresh fp32 tensor."""
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if out.shape != (n,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape ({n},), got {out.dtype} {tuple(out.shape)}")
    return out


# -- bit packing ------------------------------------------------------------------------------
def _per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits ({bits}) must be 2, 4 or 8 to pack codes into bytes")
    return 8 // bits


def _fresh(device: torch.device) -> Scratch:
    return lambda key, n, dtype: torch.empty(n, dtype=dtype, device=device)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits, 8//bits per byte, first code in the lowest bits.

    The last byte is zero-padded; the result has ceil(len·bits/8) bytes.
    """
    per = _per_byte(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    padded = torch.zeros(-(-n // per) * per, dtype=torch.uint8, device=codes.device)  # aligned
    padded[:n] = codes
    out = torch.empty(padded.numel() // per, dtype=torch.uint8, device=codes.device)
    return pack_into(padded, bits, out, _fresh(codes.device))


# Packing and unpacking treat 2 (4-bit) or 4 (2-bit) consecutive bytes as one little-endian
# integer and move the codes with a few whole-word shifts and ORs: contiguous integer ops that
# vectorise, unlike per-position strided byte ops (~5x slower on CPU). x86, ARM and CUDA are
# little-endian. Temporaries come from `scratch` (a compressor's reused buffers).
_WORD = {2: torch.int16, 4: torch.int32}


def pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """`out` ← packed `codes` (contiguous uint8, 4-byte aligned, length a multiple of 8//bits;
    overwritten)."""
    per = 8 // bits
    if per == 1:
        return out.copy_(codes)
    w = codes.view(_WORD[per])  # codes c0, c1, .. at bits 0, 8, 16, 24
    t = scratch("pack", w.numel(), w.dtype)
    if per == 2:
        torch.bitwise_right_shift(w, 4, out=t).bitwise_or_(w)  # c1 -> bit 4
    else:
        torch.bitwise_right_shift(w, 6, out=t).bitwise_or_(w)  # c1 -> bit 2, c2 -> 10, c3 -> 18
        torch.bitwise_right_shift(t, 12, out=w)
        t.bitwise_or_(w)  # c2 -> bit 4, c3 -> 6
    return out.copy_(t)  # the low byte; integer -> uint8 casts wrap


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` uint8 codes."""
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    return unpack_into(packed, bits, out, _fresh(packed.device))


def unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """`out` (any dtype) ← the first out.numel() codes in `packed`, converted to out's dtype."""
    per = _per_byte(bits)
    n = out.numel()
    m = -(-n // per)
    if packed.numel() < m:
        raise ValueError(f"{packed.numel()} packed bytes hold at most {packed.numel() * per} {bits}-bit codes, "
                         f"not {n}")
    if per == 1:
        return out.copy_(packed[:n])
    w = scratch("unpack", m, _WORD[per]).copy_(packed[:m])  # byte b at bits 0..7 of word b
    t = scratch("unpack2", m, _WORD[per])
    if per == 2:
        w.bitwise_or_(torch.bitwise_left_shift(w, 4, out=t))  # c1 -> bit 8
        w.bitwise_and_(0x0F0F)
    else:
        w.bitwise_or_(torch.bitwise_left_shift(w, 12, out=t))  # c2 -> bit 16, c3 -> 18
        w.bitwise_or_(torch.bitwise_left_shift(w, 6, out=t))  # c1 -> bit 8, c3 -> 24
        w.bitwise_and_(0x03030303)
    return out.copy_(w.view(torch.uint8)[:n])


class IdentityCompressor(Compressor):
    """No compression: the payload is the raw fp32 values (the uncompressed baselines)."""

    method = "none"
    bits = 32

    def layout(self, numel: int) -> Layout:
        return make_layout((torch.float32, numel), (torch.float32, 0), (torch.int32, 0))

    def _encode(self, x: torch.Tensor, p: Payload) -> None:
        p.codes.copy_(x)  # a copy: the caller (error feedback) may change x in place afterwards

    def _decode(self, p: Payload, out: torch.Tensor) -> None:
        out.copy_(p.codes)


class TopKCompressor(Compressor):
    """Keep the k largest |x|, send their fp32 values and int32 indices; the rest decode to 0.

    k = max(1, ceil(fraction·numel)) is fixed by (numel, fraction), so the payload size is
    known in advance. Ties at the k-th magnitude are broken arbitrarily by `torch.topk`.
    """

    method = "topk"
    bits = 32

    def __init__(self, fraction: float) -> None:
        super().__init__()
        if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"topk_fraction ({fraction}) must be in (0, 1]: the share of elements sent")
        self.fraction = float(fraction)

    def k(self, numel: int) -> int:
        """Elements kept (`kept_count`)."""
        return kept_count(self.fraction, numel)

    def layout(self, numel: int) -> Layout:
        if numel > _MAX_INT32:
            raise ValueError(f"topk indices are int32: a tensor of {numel} elements is too large; split it "
                             f"into fragments of < 2**31 elements")
        k = self.k(numel)
        return make_layout((torch.float32, k), (torch.float32, 0), (torch.int32, k))

    def _encode(self, x: torch.Tensor, p: Payload) -> None:
        idx = self._topk_indices(x, self.k(x.numel()))
        p.indices.copy_(idx)
        torch.index_select(x, 0, idx, out=p.codes)

    def _decode(self, p: Payload, out: torch.Tensor) -> None:
        out.zero_().index_copy_(0, p.indices.long(), p.codes)

    def _topk_indices(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the k largest |x|; exact, and on CPU ~10x faster than `torch.topk`.

        CPU `torch.topk` of 1% of 16M elements takes ~0.4 s. Instead, a strided sample guesses a
        threshold t that about 2k entries reach; every |x| >= t is a candidate, and when there
        are at least k of them the global top k are among them, so topk over the candidates is
        exact. A bad guess (fewer than k candidates) falls back to the full topk. CUDA's topk is
        fast and counting candidates would cost a host sync, so other devices take the direct path.
        """
        n = x.numel()
        if x.device.type != "cpu" or n < 2**16 or k > n // 16:
            return torch.topk(x.abs(), k, sorted=False).indices
        sample = x[:: n // 2**14].abs()
        rank = min(sample.numel(), math.ceil(2 * k * sample.numel() / n) + 8)
        t = torch.topk(sample, rank, sorted=False).values.min()
        parts = []
        for s in range(0, n, CPU_CHUNK):  # chunks: |x| in a cache-sized scratch, not an N-sized one
            xc = x[s:s + CPU_CHUNK]
            a = torch.abs(xc, out=self._work("abs", xc.numel(), torch.float32, x.device))
            parts.append(torch.nonzero(a >= t).view(-1).add_(s))
        cand = torch.cat(parts)
        if cand.numel() < k:
            return torch.topk(x.abs(), k, sorted=False).indices
        return cand[torch.topk(x[cand].abs(), k, sorted=False).indices]


def has_nonfinite(x: torch.Tensor) -> bool:
    """True if x holds a NaN or ±inf: check a pseudo-gradient before it is sent or fed to EF.

    min/max propagate NaN and expose ±inf, so two reductions do it without an N-sized temporary.
    """
    if x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return not bool(torch.isfinite(lo) & torch.isfinite(hi))
