"""Wire format and block quantizers for pseudo-gradients (DESIGN §1, error-feedback compression).

The public entry point is `compression.py` (`make_compressor`); this module holds the pieces it
builds on: the `Payload` that goes on the wire, the `Compressor` base, bit packing, and the three
block-wise quantizers (linear, statistical, E3M0).

Design choices that matter for the wire:
- A payload's size is a function of (numel, config) only, so every rank of a collective knows
  how many bytes it will receive without an extra exchange.
- A payload is ONE contiguous uint8 buffer; its tensors are views into it, ordered by element
  size (largest first) so every view is aligned and `to_flat_bytes()` costs no copy.
- Per-block metadata is stored in `meta_dtype` (default bfloat16: 2 bytes like fp16 but with
  fp32's range, so tiny or huge pseudo-gradients never under/overflow). Block minima are rounded
  DOWN and scales UP before the codes are computed from the stored values, so the error bound
  holds exactly for what the receiver decodes.
- All math stays on the input's device and is vectorised; large temporaries live in a per-compressor
  scratch buffer that is reused across calls (fresh 4·N-byte allocations cost more than the math).
  A compressor is therefore not thread-safe: use one per thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

Layout = tuple[tuple[str, torch.dtype, int], ...]  # (field, dtype, count), in wire order
META_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TINY = 1e-30  # smallest scale: keeps all-zero and constant blocks finite


@dataclass(frozen=True)
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
        need = sum(n * _itemsize(dt) for _, dt, n in layout)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != need:
            raise ValueError(f"payload buffer must be 1-D uint8 of {need} bytes for method '{method}' "
                             f"and numel {numel}; got {buf.dtype} of shape {tuple(buf.shape)}")
        parts: dict[str, torch.Tensor] = {}
        off = 0
        for name, dt, n in layout:
            size = n * _itemsize(dt)
            chunk = buf[off:off + size]
            if chunk.data_ptr() % _itemsize(dt):
                chunk = chunk.clone()  # a slice of a gathered buffer may be misaligned for `dt`
            parts[name] = chunk.view(dt)
            off += size
        return cls(method, numel, bits, block_size, parts["codes"], parts["meta"], parts["indices"], buf)


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


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

    def layout(self, numel: int) -> Layout:
        raise NotImplementedError

    def compress(self, x: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def payload_nbytes(self, numel: int) -> int:
        """Bytes of the payload of a `numel`-element tensor: known before compressing."""
        return sum(n * _itemsize(dt) for _, dt, n in self.layout(numel))

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
        flat = torch.empty(sum(n * _itemsize(dt) for _, dt, n in layout), dtype=torch.uint8, device=device)
        return Payload.from_flat_bytes(flat, layout, method=self.method, numel=numel, bits=self.bits,
                                       block_size=self.block_size)

    def _work(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable scratch tensor of at least `numel` elements (contents undefined)."""
        buf = self._scratch.get((key, device, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[(key, device, dtype)] = buf
        return buf[:numel]

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


# -- bit packing ------------------------------------------------------------------------------
def _per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits ({bits}) must be 2, 4 or 8 to pack codes into bytes")
    return 8 // bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits, 8//bits per byte, first code in the lowest bits.

    The last byte is zero-padded; the result has ceil(len·bits/8) bytes.
    """
    per = _per_byte(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if per == 1:
        return codes.clone()
    if n % per:
        codes = torch.cat([codes, codes.new_zeros(per - n % per)])
    return _pack_into(codes, bits, torch.empty(codes.numel() // per, dtype=torch.uint8, device=codes.device))


def _pack_into(codes: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """`out` ← packed `codes` (length a multiple of 8//bits): shifts and ORs over strided views."""
    per = 8 // bits
    if per == 1:
        return out.copy_(codes)
    c = codes.view(-1, per)
    torch.bitwise_left_shift(c[:, 1], bits, out=out)
    out |= c[:, 0]
    for j in range(2, per):  # at most 2 more: over bit positions, never over elements
        out |= c[:, j] << (j * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` uint8 codes."""
    per = _per_byte(bits)
    if packed.numel() * per < numel:
        raise ValueError(f"{packed.numel()} packed bytes hold at most {packed.numel() * per} {bits}-bit codes, "
                         f"not {numel}")
    if per == 1:
        return packed[:numel].clone()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).view(-1)[:numel]


def code_lut(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8//bits) fp32 table: byte -> the codes it packs, so unpacking is one gather."""
    per = 8 // bits
    b = torch.arange(256, dtype=torch.int32, device=device).unsqueeze(1)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=device)
    return ((b >> shifts) & (2**bits - 1)).to(torch.float32).view(256, per)


def lut_decode_into(packed: torch.Tensor, lut: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out[i]` ← lut row of byte i//per, column i%per: unpack and map codes in one gather."""
    per = lut.shape[1]
    n = out.numel()
    full = n // per
    idx = packed.to(torch.int32)
    if full:
        torch.index_select(lut, 0, idx[:full], out=out[:full * per].view(full, per))
    if n % per:
        out[full * per:].copy_(lut[idx[full].long()][: n % per])
    return out


# -- block views ------------------------------------------------------------------------------
class Blocks:
    """A flat tensor of n elements seen as full blocks (nf, B) plus one partial tail block (1, r).

    Splitting instead of padding avoids copying the input just to make it divisible by B.
    """

    def __init__(self, n: int, block_size: int) -> None:
        self.n, self.B = n, block_size
        self.nf, self.r = divmod(n, block_size)
        self.nb = self.nf + (1 if self.r else 0)

    def views(self, t: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
        """[(2-D view of t, rows of the per-block params it uses)]; t has >= n elements."""
        out = []
        if self.nf:
            out.append((t[:self.nf * self.B].view(self.nf, self.B), slice(0, self.nf)))
        if self.r:
            out.append((t[self.nf * self.B:self.n].view(1, self.r), slice(self.nf, self.nb)))
        return out

    def reduce(self, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(nb,) per-block reduction, fn reduces a 2-D view over dim 1."""
        parts = [fn(v) for v, _ in self.views(t)]
        return torch.cat(parts) if parts else t.new_zeros(0)

    def counts(self, device: torch.device) -> torch.Tensor:
        """(nb,) fp32 element count per block (B, except the tail)."""
        c = torch.full((self.nb,), float(self.B), device=device)
        if self.r:
            c[-1] = self.r
        return c


def round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in `dtype`, rounded towards -inf, so the stored value never exceeds v."""
    s = v.to(dtype)
    return torch.where(s.float() > v, torch.nextafter(s, s.new_full((), -math.inf)), s)


def round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in `dtype`, rounded towards +inf, so the stored value is never below v."""
    s = v.to(dtype)
    return torch.where(s.float() < v, torch.nextafter(s, s.new_full((), math.inf)), s)


def _check_block_args(method: str, bits: int, allowed: tuple[int, ...], block_size: int,
                      meta_dtype: torch.dtype) -> None:
    if bits not in allowed:
        raise ValueError(f"bits ({bits}) must be one of {allowed} for method '{method}'")
    if block_size < 1:
        raise ValueError(f"block_size ({block_size}) must be >= 1 elements")
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype ({meta_dtype}) must be torch.bfloat16, torch.float16 or torch.float32")


def _out(out: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    if out.shape != (n,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape ({n},), got {out.dtype} {tuple(out.shape)}")
    return out


class _BlockQuantizer(Compressor):
    """Shared plumbing of the block quantizers: layout, caches, packing of uint8 codes."""

    def __init__(self, bits: int, block_size: int, meta_dtype: torch.dtype, meta_per_block: int) -> None:
        super().__init__()
        self.bits, self.block_size, self.meta_dtype = bits, block_size, meta_dtype
        self.per = 8 // bits
        self.meta_per_block = meta_per_block
        self._luts: dict[tuple[str, torch.device], torch.Tensor] = {}

    def layout(self, numel: int) -> Layout:
        nb = -(-numel // self.block_size)
        return make_layout((torch.uint8, -(-numel // self.per)), (self.meta_dtype, nb * self.meta_per_block),
                           (torch.int32, 0))

    def _lut(self, key: str, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        lut = self._luts.get((key, device))
        if lut is None:
            lut = self._luts[(key, device)] = build()
        return lut

    def _pack(self, codes: torch.Tensor, n: int, out: torch.Tensor) -> None:
        """Pack `codes` (uint8 scratch, >= n rounded up to 8//bits, first n valid) into `out`."""
        npad = out.numel() * self.per
        codes[n:npad].zero_()
        _pack_into(codes[:npad], self.bits, out)


class LinearQuantizer(_BlockQuantizer):
    """Uniform min/max quantization per block of `block_size` elements, round to nearest.

    Per block the wire carries [min, scale] in `meta_dtype` (min rounded down, scale rounded up)
    and 2**bits codes; the decoder returns min + code·scale, so |x − x̂| ≤ scale/2 exactly.
    Meta layout: (2, num_blocks), row 0 the minima, row 1 the scales.
    """

    method = "linear"

    def __init__(self, bits: int, block_size: int, meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, bits, (2, 4, 8), block_size, meta_dtype)
        super().__init__(bits, block_size, meta_dtype, meta_per_block=2)
        self.levels = 2**bits - 1

    def compress(self, x: torch.Tensor) -> Payload:
        x = as_flat_f32(x)
        n, dev = x.numel(), x.device
        p = self._alloc(n, dev)
        if n == 0:
            return p
        blocks = Blocks(n, self.block_size)
        lo = blocks.reduce(x, lambda v: v.amin(dim=1))
        hi = blocks.reduce(x, lambda v: v.amax(dim=1))
        lo_s = round_down(lo, self.meta_dtype)
        lo_f = lo_s.float()
        # The scale floor keeps constant blocks finite and |x|/scale <= 2**20, so the fp32 code
        # arithmetic below is off by far less than half a level.
        floor = torch.maximum(lo.abs(), hi.abs()).mul_(2.0**-20).clamp_min_(_TINY)
        sc_s = round_up(torch.maximum((hi - lo_f) / self.levels, floor), self.meta_dtype)
        meta = p.meta.view(2, blocks.nb)
        meta[0].copy_(lo_s)
        meta[1].copy_(sc_s)
        inv = 1.0 / sc_s.float()
        bias = 0.5 - lo_f * inv  # +0.5 then truncation in the uint8 cast = round to nearest
        q = self._work("q", n, torch.float32, dev)
        for (xv, sl), (qv, _) in zip(blocks.views(x), blocks.views(q)):
            torch.addcmul(bias[sl, None], xv, inv[sl, None], out=qv)
        if self.bits == 8:
            p.codes.copy_(q)
        else:
            codes = self._work("c", p.codes.numel() * self.per, torch.uint8, dev)
            codes[:n].copy_(q)
            self._pack(codes, n, p.codes)
        return p

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_payload(p)
        n, dev = p.numel, p.codes.device
        out = _out(out, n, dev)
        if n == 0:
            return out
        if self.bits == 8:
            out.copy_(p.codes)
        else:
            lut_decode_into(p.codes, self._lut("codes", dev, lambda: code_lut(self.bits, dev)), out)
        blocks = Blocks(n, self.block_size)
        meta = p.meta.view(2, blocks.nb).float()
        for ov, sl in blocks.views(out):
            torch.addcmul(meta[0, sl, None], ov, meta[1, sl, None], out=ov)
        return out


class StatisticalQuantizer(_BlockQuantizer):
    """MuLoCo's default quantizer: per block, 2**bits uniform bins over mean ± clip·σ.

    Values beyond ±clip·σ fall in the end bins. Each bin is reconstructed as the MEAN of the
    values that fell into it, so the 2**bits bin means of every block are the metadata
    (meta layout: (num_blocks, 2**bits)); empty bins carry their centre. That metadata is
    2**bits·2 bytes per block: at 8 bits use large blocks, or it outweighs the codes.
    """

    method = "statistical"

    def __init__(self, bits: int, block_size: int, clip: float = 6.0,
                 meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, bits, (2, 4, 8), block_size, meta_dtype)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"statistical clip ({clip}) must be a positive number of standard deviations")
        super().__init__(bits, block_size, meta_dtype, meta_per_block=2**bits)
        self.clip = float(clip)
        self.nbins = 2**bits

    def compress(self, x: torch.Tensor) -> Payload:
        x = as_flat_f32(x)
        n, dev, nbins = x.numel(), x.device, self.nbins
        p = self._alloc(n, dev)
        if n == 0:
            return p
        blocks = Blocks(n, self.block_size)
        cnt = blocks.counts(dev)
        mean = blocks.reduce(x, lambda v: v.sum(dim=1)) / cnt
        d = self._work("q", n, torch.float32, dev)
        for (xv, sl), (dv, _) in zip(blocks.views(x), blocks.views(d)):
            torch.sub(xv, mean[sl, None], out=dv)
        sq = blocks.reduce(d, lambda v: torch.bmm(v.unsqueeze(1), v.unsqueeze(2)).view(-1))
        width = (2 * self.clip / nbins) * (sq / cnt).sqrt_()
        width = torch.maximum(width, mean.abs().mul_(2.0**-20).clamp_min_(_TINY))
        inv = 1.0 / width
        half = torch.full((1, 1), nbins / 2, device=dev)
        for dv, sl in blocks.views(d):
            torch.addcmul(half, dv, inv[sl, None], out=dv)
        d.clamp_(0.0, nbins - 0.5)
        ids = self._work("ids", n, torch.int32, dev)
        ids.copy_(d)  # truncation = floor on [0, nbins): the bin of each value
        if self.bits == 8:
            p.codes.copy_(ids)
        else:
            codes = self._work("c", p.codes.numel() * self.per, torch.uint8, dev)
            codes[:n].copy_(ids)
            self._pack(codes, n, p.codes)
        offsets = torch.arange(0, blocks.nb * nbins, nbins, dtype=torch.int32, device=dev)
        for iv, sl in blocks.views(ids):
            iv.add_(offsets[sl, None])
        sums = torch.zeros(blocks.nb * nbins, device=dev).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=blocks.nb * nbins).to(torch.float32)
        centres = (torch.arange(nbins, device=dev) + 0.5 - nbins / 2) * width[:, None] + mean[:, None]
        means = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres.view(-1))
        p.meta.copy_(means)
        return p

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_payload(p)
        n, dev = p.numel, p.codes.device
        out = _out(out, n, dev)
        if n == 0:
            return out
        blocks = Blocks(n, self.block_size)
        ids = self._work("ids", n, torch.int32, dev)
        if self.bits == 8:
            ids.copy_(p.codes)
        else:
            lut = self._lut("ids", dev, lambda: code_lut(self.bits, dev).to(torch.int32))
            lut_decode_into(p.codes, lut, ids)
        offsets = torch.arange(0, blocks.nb * self.nbins, self.nbins, dtype=torch.int32, device=dev)
        for iv, sl in blocks.views(ids):
            iv.add_(offsets[sl, None])
        return torch.index_select(p.meta.float(), 0, ids, out=out)


def e3m0_table(device: torch.device) -> torch.Tensor:
    """The 16 E3M0 values for scale 1: code = sign<<3 | e; e = 0 is zero, else 2**(e−7).

    Magnitudes 0, 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1; the sign bit negates (code 8 is −0).
    """
    e = torch.arange(8, device=device, dtype=torch.float32)
    mag = torch.where(e > 0, torch.exp2(e - 7), torch.zeros_like(e))
    return torch.cat([mag, -mag])


class E3M0Quantizer(_BlockQuantizer):
    """4-bit floats with 1 sign and 3 exponent bits (Streaming DiLoCo), per-block absmax scale.

    Each value becomes ±scale·2**(e−7), e in 1..7, or 0 (see `e3m0_table`), rounded to the
    nearest level in linear terms. Meta layout: (num_blocks,) scales, rounded up.
    """

    method = "e3m0"

    def __init__(self, block_size: int, meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, 4, (4,), block_size, meta_dtype)
        super().__init__(4, block_size, meta_dtype, meta_per_block=1)

    def compress(self, x: torch.Tensor) -> Payload:
        x = as_flat_f32(x)
        n, dev = x.numel(), x.device
        p = self._alloc(n, dev)
        if n == 0:
            return p
        blocks = Blocks(n, self.block_size)
        a = self._work("q", n, torch.float32, dev)
        torch.abs(x, out=a)
        sc_s = round_up(blocks.reduce(a, lambda v: v.amax(dim=1)).clamp_min_(_TINY), self.meta_dtype)
        p.meta.copy_(sc_s)
        # y = (4/3)·|x|/scale = 1.f·2**E  =>  the nearest power of two to |x|/scale is 2**E, since
        # the midpoints between 2**(E-1), 2**E, 2**(E+1) are 0.75·2**E and 1.5·2**E.
        f = (4.0 / 3.0) / sc_s.float()
        for av, sl in blocks.views(a):
            av.mul_(f[sl, None])
        zero = self._work("z", n, torch.bool, dev)
        torch.lt(a, (4.0 / 3.0) / 128, out=zero)  # |x|/scale < 1/128: nearer to 0 than to 1/64
        a.clamp_min_(2.0**-6)  # smallest non-zero level 2**-6 <=> biased exponent 121 = e 1
        ai = a.view(torch.int32)
        ai.bitwise_right_shift_(23)  # biased exponent E + 127, in 121..127 (y < 2)
        codes = self._work("c", p.codes.numel() * 2, torch.uint8, dev)
        c = codes[:n]
        c.copy_(ai)
        c.sub_(120)
        c.masked_fill_(zero, 0)
        neg = self._work("z", n, torch.bool, dev)
        torch.lt(x, 0, out=neg)
        c.bitwise_or_(neg.view(torch.uint8) << 3)
        self._pack(codes, n, p.codes)
        return p

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_payload(p)
        n, dev = p.numel, p.codes.device
        out = _out(out, n, dev)
        if n == 0:
            return out
        def build() -> torch.Tensor:
            t = e3m0_table(dev)
            b = torch.arange(256, device=dev)
            return torch.stack([t[b & 15], t[b >> 4]], dim=1)
        lut_decode_into(p.codes, self._lut("e3m0", dev, build), out)
        blocks = Blocks(n, self.block_size)
        sc = p.meta.float()
        for ov, sl in blocks.views(out):
            ov.mul_(sc[sl, None])
        return out
