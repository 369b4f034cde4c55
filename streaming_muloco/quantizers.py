"""Block quantizers for pseudo-gradients: linear (min/max), statistical (MuLoCo) and E3M0.

Built by `compressors.make_compressor`; they share the wire format and `Compressor` base of
`compression.py`, whose `compress`/`decompress` do the checks, allocation and empty case and call
`_BlockQuantizer`'s hooks, which split the tensor into `Blocks` for each method's `_quantize` /
`_dequantize`. Per-block metadata is stored in `meta_dtype` (default bfloat16: 2 bytes like
fp16 but with fp32's range, so tiny or huge pseudo-gradients never under/overflow). Block minima
are rounded DOWN and scales UP before the codes are computed from the stored values, so the
error bounds hold exactly for what the receiver decodes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import compression
from . import native
from .compression import (
    META_DTYPES,
    Compressor,
    Layout,
    Payload,
    make_layout,
    pack_into,
    unpack_into,
)

_TINY = 1e-30  # smallest scale: keeps all-zero and constant blocks finite


class Blocks:
    """A flat tensor of n elements as full blocks (nf, B) plus one partial tail block (1, r).

    Splitting instead of padding avoids copying the input just to make it divisible by B.
    Elementwise work runs chunk by chunk (`chunks`): on CPU a chunk of ~CPU_CHUNK elements stays
    in cache through the several passes a quantizer makes, faster than whole-tensor passes (up
    to 1.5x) and with chunk-sized scratch instead of N-sized. On other devices chunks are
    DEVICE_CHUNK elements, only to bound the scratch memory.
    """

    def __init__(self, n: int, block_size: int, device: torch.device) -> None:
        self.n, self.B = n, block_size
        self.nf, self.r = divmod(n, block_size)
        self.nb = self.nf + (1 if self.r else 0)
        # whole blocks and a multiple of 4 elements, so a chunk's packed codes start on a byte
        target = compression.CPU_CHUNK if device.type == "cpu" else compression.DEVICE_CHUNK
        self.chunk = max(4, target // block_size // 4 * 4) * block_size

    def chunks(self) -> list[tuple[int, int]]:
        """Element ranges [s, e) covering 0..n; every s is a multiple of B and of 4."""
        return [(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]

    def views(self, t: torch.Tensor, s: int = 0, e: int | None = None) -> list[tuple[torch.Tensor, slice]]:
        """[(2-D view of t, slice of the per-block params its rows use)], where t holds the
        elements [s, e) (default: all n) and s is a multiple of B."""
        e = self.n if e is None else e
        full_end = min(e, self.nf * self.B)
        rows, b0 = max(0, full_end - s) // self.B, s // self.B
        out = []
        if rows:
            out.append((t[:rows * self.B].view(rows, self.B), slice(b0, b0 + rows)))
        if self.r and e == self.n:
            out.append((t[rows * self.B:e - s].view(1, self.r), slice(self.nf, self.nb)))
        return out

    def block_range(self, s: int, e: int) -> tuple[int, int]:
        """The blocks [b0, b1) that the elements [s, e) belong to."""
        return s // self.B, -(-e // self.B)

    def reduce(self, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(nb,) per-block reduction of all n elements; fn reduces a 2-D view over dim 1."""
        parts = [fn(v) for v, _ in self.views(t)]
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else t.new_zeros(0)

    def counts(self, device: torch.device) -> torch.Tensor:
        """(nb,) fp32 element count per block (B, except the tail)."""
        c = torch.full((self.nb,), float(self.B), device=device)
        if self.r:
            c[-1] = self.r
        return c


def round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v (fp32) stored in `dtype`, never above v: what the decoder sees is a safe block minimum."""
    return _round_directed(v, dtype, -1.0)


def round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v (fp32) stored in `dtype`, never below v: a stored scale always covers the block."""
    return _round_directed(v, dtype, 1.0)


def _round_directed(v: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """Round to nearest; where that went the wrong way, step out by |s|·eps + the smallest subnormal.

    That step is at least one ulp, so the result is on the requested side, within 2 ulps of v;
    values that are exactly representable (0 above all) stay exact. Plain arithmetic, so it runs
    on every device and dtype.
    """
    if dtype == v.dtype:
        return v
    s = v.to(dtype)
    sf = s.float()
    wrong = sf < v if direction > 0 else sf > v
    fi = torch.finfo(dtype)
    stepped = sf.abs().mul_(direction * fi.eps).add_(sf).add_(direction * fi.tiny * fi.eps).to(dtype)
    return torch.where(wrong, stepped, s)


def _check_block_args(method: str, bits: int, allowed: tuple[int, ...], block_size: int,
                      meta_dtype: torch.dtype) -> None:
    if bits not in allowed:
        raise ValueError(f"bits ({bits}) must be one of {allowed} for method '{method}'")
    if block_size < 1:
        raise ValueError(f"block_size ({block_size}) must be >= 1 elements")
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"meta_dtype ({meta_dtype}) must be torch.bfloat16, torch.float16 or torch.float32")


class _BlockQuantizer(Compressor):
    """Shared plumbing of the block quantizers: layout, caches, packing of integer codes."""

    _lookup_decoder = False  # whether the torch decoder writes `out` through `index_select`

    @property
    def _serial_lookup(self) -> bool:
        """A torch lookup decoder is serial on CPU; the fused one (`native.py`) is threaded."""
        return self._lookup_decoder and native.library() is None

    def __init__(self, bits: int, block_size: int, meta_dtype: torch.dtype, meta_per_block: int) -> None:
        super().__init__()
        self.bits, self.block_size, self.meta_dtype = bits, block_size, meta_dtype
        self.per = 8 // bits
        self.meta_per_block = meta_per_block
        self._luts: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def alignment(self) -> int:
        """Blocks start at multiples of block_size, so a cut there leaves every block whole."""
        return self.block_size

    def decompress(self, p: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """`Compressor.decompress`; a fresh CPU output of a lookup decoder is zeroed first.

        The zeroing runs on all threads and so takes the first-touch page faults of the fresh
        buffer, which would otherwise all fall in the serial `index_select` lookups (at 16M
        elements ~2/3 of their time). A given `out` (already touched) is used as it is.
        """
        if out is None and self._serial_lookup and p.codes.device.type == "cpu":
            out = torch.zeros(p.numel, dtype=torch.float32)
        return super().decompress(p, out)

    def _encode(self, x: torch.Tensor, p: Payload) -> None:
        """The block split every quantizer needs, made once here."""
        self._quantize(x, p, Blocks(x.numel(), self.block_size, x.device))

    def _decode(self, p: Payload, out: torch.Tensor) -> None:
        """The block split on the payload's device (where the scratch buffers live)."""
        self._dequantize(p, out, Blocks(p.numel, self.block_size, p.codes.device))

    def _quantize(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        """Fill `p` from `x` (flat contiguous fp32, not empty) split as `blocks`."""
        raise NotImplementedError

    def _dequantize(self, p: Payload, out: torch.Tensor, blocks: Blocks) -> None:
        """Write the decoded values of `p` (split as `blocks`) into `out`."""
        raise NotImplementedError

    def layout(self, numel: int) -> Layout:
        return self.block_layout(numel, self.block_size)

    def block_layout(self, numel: int, block_size: int) -> Layout:
        """The wire layout of `numel` elements cut in blocks of `block_size` (the last may be
        partial). Parameter-aware compression (`segments.py`) calls it with each parameter's
        own block size, so a method's layout must follow from these two numbers alone."""
        nb = -(-numel // block_size)
        return make_layout((torch.uint8, -(-numel // self.per)), (self.meta_dtype, nb * self.meta_per_block),
                           (torch.int32, 0))

    def _lut(self, key: str, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        lut = self._luts.get((key, device))
        if lut is None:
            lut = self._luts[(key, device)] = build()
        return lut

    def _packed(self, codes: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """The bytes of the packed `codes` that hold elements [s, e) (s a multiple of 4)."""
        return codes[s // self.per:-(-e // self.per)]

    def _store_codes(self, q: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
        """Pack trunc(q) (fp32 in [0, 2**bits), elements s.. of the tensor) into the payload codes.

        fp32 -> int32 in place, then -> uint8: ~2x faster on CPU than a direct fp32 -> uint8 cast.
        Returns the int32 view of q.
        """
        ids = q.view(torch.int32)
        ids.copy_(q)
        self._store_int_codes(ids, s, out)
        return ids

    def _store_int_codes(self, ids: torch.Tensor, s: int, out: torch.Tensor) -> None:
        """Pack ids (integers in [0, 2**bits), elements s.. of the tensor) into the payload codes."""
        m = ids.numel()
        if self.bits == 8:
            self._packed(out, s, s + m).copy_(ids)
            return
        codes = self._code_buffer(m, ids.device)
        codes[:m].copy_(ids)
        self._pack_from(codes, m, s, out)

    def _code_buffer(self, m: int, device: torch.device) -> torch.Tensor:
        """uint8 scratch for m codes, padded to whole bytes of packed codes."""
        return self._work("c", -(-m // self.per) * self.per, torch.uint8, device)

    def _pack_from(self, codes: torch.Tensor, m: int, s: int, out: torch.Tensor) -> None:
        """Pack the first m entries of `codes` (a `_code_buffer`) as the codes of elements s.."""
        codes[m:].zero_()
        pack_into(codes, self.bits, self._packed(out, s, s + m), self._scratch_fn(codes.device))


class LinearQuantizer(_BlockQuantizer):
    """Uniform min/max quantization per block of `block_size` elements, round to nearest.

    Per block the wire carries [min, scale] in `meta_dtype` (min rounded down, scale rounded up)
    and one `bits`-bit code per element; the decoder returns min + code·scale, so
    |x − x̂| ≤ scale/2 holds exactly for the stored scale. Ties round up.
    Meta layout: (2, num_blocks), row 0 the minima, row 1 the scales.
    """

    method = "linear"

    def __init__(self, bits: int, block_size: int, meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, bits, (2, 4, 8), block_size, meta_dtype)
        super().__init__(bits, block_size, meta_dtype, meta_per_block=2)
        self.levels = 2**bits - 1

    def _quantize(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        dev = x.device
        lo = blocks.reduce(x, lambda v: v.amin(dim=1))
        hi = blocks.reduce(x, lambda v: v.amax(dim=1))
        lo_s = round_down(lo, self.meta_dtype)
        lo_f = lo_s.float()
        # The scale floor keeps constant blocks finite and |x|/scale <= 2**20, so the fp32 code
        # arithmetic below is off by far less than half a level.
        floor = torch.maximum(hi, lo.neg()).mul_(2.0**-20).clamp_min_(_TINY)  # max |x|·2**-20
        sc_s = round_up(torch.maximum((hi - lo_f) / self.levels, floor), self.meta_dtype)
        meta = p.meta.view(2, blocks.nb)
        meta[0].copy_(lo_s)
        meta[1].copy_(sc_s)
        inv = 1.0 / sc_s.float()
        bias = 0.5 - lo_f * inv  # +0.5 then truncation in the integer cast = round to nearest
        for s, e in blocks.chunks():
            q = self._work("q", e - s, torch.float32, dev)
            for (xv, sl), (qv, _) in zip(blocks.views(x[s:e], s, e), blocks.views(q, s, e)):
                # two binary ops: CPU vectorises them, not the 3-operand broadcast addcmul (3x slower)
                torch.mul(xv, inv[sl, None], out=qv).add_(bias[sl, None])
            self._store_codes(q, s, p.codes)

    def _dequantize(self, p: Payload, out: torch.Tensor, blocks: Blocks) -> None:
        dev = p.codes.device
        meta = p.meta.view(2, blocks.nb).float()
        for s, e in blocks.chunks():
            oc = unpack_into(self._packed(p.codes, s, e), self.bits, out[s:e], self._scratch_fn(dev))
            for ov, sl in blocks.views(oc, s, e):
                ov.mul_(meta[1, sl, None]).add_(meta[0, sl, None])


class StatisticalQuantizer(_BlockQuantizer):
    """MuLoCo's default quantizer: per block, 2**bits uniform bins over mean ± clip·σ.

    Values beyond ±clip·σ fall in the end bins. Each bin is reconstructed as the MEAN of the
    values that fell into it, so the 2**bits bin means of every block are the metadata
    (meta layout: (num_blocks, 2**bits)); empty bins carry their centre. That metadata is
    2**bits·2 bytes per block: at 8 bits use large blocks, or it outweighs the codes.

    On CPU the fused kernels of `native.py` do the work, each block read from memory once (about
    2x the torch ops' throughput). Elsewhere, or without a C compiler, torch ops do: each
    cache-sized chunk of x makes one trip from memory, its blocks' means, σ, codes and per-bin
    sums and counts all computed before the next chunk. The two paths differ only in summation
    order, so a value on a bin edge may take the neighbouring bin; decoders of either agree.
    """

    method = "statistical"
    _lookup_decoder = True

    def __init__(self, bits: int, block_size: int, clip: float = 6.0,
                 meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, bits, (2, 4, 8), block_size, meta_dtype)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"statistical clip ({clip}) must be a positive number of standard deviations")
        super().__init__(bits, block_size, meta_dtype, meta_per_block=2**bits)
        self.clip = float(clip)
        self.nbins = 2**bits

    def _local_ids(self, ids: torch.Tensor, blocks: Blocks, s: int, e: int) -> None:
        """bin -> bin + nbins·(block − first block of the chunk), in place."""
        b0, b1 = blocks.block_range(s, e)
        offsets = torch.arange(0, (b1 - b0) * self.nbins, self.nbins, dtype=torch.int32, device=ids.device)
        for iv, sl in blocks.views(ids, s, e):
            iv.add_(offsets[sl.start - b0:sl.stop - b0, None])

    def _quantize(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        if blocks.B % self.per == 0 and native.usable(x, p.codes, p.meta):
            f32 = p.meta.dtype == torch.float32
            meta = p.meta if f32 else self._work("meta32", p.meta.numel(), torch.float32, x.device)
            native.stat_quantize(x, blocks.B, self.bits, self.clip, p.codes, meta)
            if not f32:
                p.meta.copy_(meta)
            return
        self._quantize_torch(x, p, blocks)

    def _quantize_torch(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        dev, nbins = x.device, self.nbins
        n = blocks.counts(dev)
        mean, width = torch.empty(blocks.nb, device=dev), torch.empty(blocks.nb, device=dev)
        sums, counts = torch.empty(blocks.nb, nbins, device=dev), torch.empty(blocks.nb, nbins, device=dev)
        for s, e in blocks.chunks():
            b0, b1 = blocks.block_range(s, e)
            d = self._work("q", e - s, torch.float32, dev)
            sq = self._work("sq", b1 - b0, torch.float32, dev)
            parts = [(xv, dv, sl) for (xv, sl), (dv, _) in zip(blocks.views(x[s:e], s, e), blocks.views(d, s, e))]
            for xv, dv, sl in parts:  # sum of squares about the mean: two passes over cached data, stable
                m = torch.sum(xv, dim=1, out=mean[sl]).div_(n[sl])
                torch.sub(xv, m[:, None], out=dv)
                torch.bmm(dv.unsqueeze(1), dv.unsqueeze(2), out=sq[sl.start - b0:sl.stop - b0].view(-1, 1, 1))
            w = torch.mul(sq.div_(n[b0:b1]).sqrt_(), 2 * self.clip / nbins, out=width[b0:b1])
            torch.maximum(w, mean[b0:b1].abs().mul_(2.0**-20).clamp_min_(_TINY), out=w)
            inv = w.reciprocal()
            for _, dv, sl in parts:
                dv.mul_(inv[sl.start - b0:sl.stop - b0, None])
            d.add_(nbins / 2).clamp_(0.0, nbins - 0.5)  # then truncation = floor: the bin
            ids = self._store_codes(d, s, p.codes)
            self._bin_totals(x, ids, p.codes, blocks, s, e, sums, counts)
        centres = (torch.arange(nbins, device=dev) + 0.5 - nbins / 2) * width[:, None] + mean[:, None]
        filled = counts > 0
        p.meta.view(blocks.nb, nbins).copy_(torch.where(filled, sums.div_(counts.clamp_min_(1.0)), centres))

    def _bin_totals(self, x: torch.Tensor, ids: torch.Tensor, codes: torch.Tensor, blocks: Blocks, s: int,
                    e: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """sums, counts[block, bin] ← the sum and the number of the values of x[s:e] in each bin.

        For 4 or 16 bins, `embedding_bag` of the codes over a one-hot table adds each block's
        values into their bins in one call, in element order, in parallel over blocks (on CPU
        index_add_ + bincount are serial and take ~1.3x the CPU time). Counts come from the packed
        bytes (4 or 2 codes each) and a table of each byte's bin counts: 2-4x fewer lookups.
        256 bins would make 1 KiB one-hot rows: there index_add_ and bincount stay.
        """
        dev, nbins = x.device, self.nbins
        parts = list(zip(blocks.views(x[s:e], s, e), blocks.views(ids, s, e)))
        if nbins > 16:
            b0, b1 = blocks.block_range(s, e)
            self._local_ids(ids, blocks, s, e)
            sums[b0:b1].view(-1).zero_().index_add_(0, ids, x[s:e])
            counts[b0:b1].view(-1).copy_(torch.bincount(ids, minlength=(b1 - b0) * nbins))
            return
        eye = self._lut("eye", dev, lambda: torch.eye(nbins, device=dev))
        for (xv, sl), (iv, _) in parts:
            sums[sl] = F.embedding_bag(iv, eye, mode="sum", per_sample_weights=xv)
            if xv.shape[1] % self.per or xv.shape[0] == 1:  # bytes shared by two blocks, or a padded tail
                counts[sl] = F.embedding_bag(iv, eye, mode="sum")
            else:
                rows, row_bytes = xv.shape[0], xv.shape[1] // self.per
                packed = self._work("bytes", rows * row_bytes, torch.int32, dev)
                packed.copy_(self._packed(codes, s, s + xv.numel()))
                counts[sl] = F.embedding_bag(packed.view(rows, row_bytes), self._byte_counts(dev), mode="sum")

    def _byte_counts(self, device: torch.device) -> torch.Tensor:
        """(256, nbins) fp32: how many of the codes packed in byte v are equal to each bin."""
        def build() -> torch.Tensor:
            v = torch.arange(256, device=device)
            codes = torch.stack([(v >> (self.bits * i)) & (self.nbins - 1) for i in range(self.per)], 1)
            return (codes[:, :, None] == torch.arange(self.nbins, device=device)).sum(1).float()
        return self._lut("byte_counts", device, build)

    def _dequantize(self, p: Payload, out: torch.Tensor, blocks: Blocks) -> None:
        dev = p.codes.device
        means = p.meta.float()
        if native.usable(p.codes, means, out):
            native.lut_decode(p.codes, means, blocks.B, self.bits, out)
            return
        for s, e in blocks.chunks():
            ids = self._work("ids", e - s, torch.int32, dev)
            unpack_into(self._packed(p.codes, s, e), self.bits, ids, self._scratch_fn(dev))
            self._local_ids(ids, blocks, s, e)
            b0, b1 = blocks.block_range(s, e)
            torch.index_select(means[b0 * self.nbins:b1 * self.nbins], 0, ids, out=out[s:e])


_F32_BITS_1_96 = 0x3C2AAAAB  # fp32 bit patterns (as int32) of 1/96 (rounded up) and of 2**-6
_F32_BITS_2_M6 = 0x3C800000


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
    _lookup_decoder = True

    def __init__(self, block_size: int, meta_dtype: torch.dtype = torch.bfloat16) -> None:
        _check_block_args(self.method, 4, (4,), block_size, meta_dtype)
        super().__init__(4, block_size, meta_dtype, meta_per_block=1)

    def _quantize(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        dev = x.device
        absmax = torch.maximum(blocks.reduce(x, lambda v: v.amax(dim=1)),
                               blocks.reduce(x, lambda v: v.amin(dim=1)).neg_())
        sc_s = round_up(absmax.clamp_min_(_TINY), self.meta_dtype)
        p.meta.copy_(sc_s)
        # y = (4/3)·|x|/scale = 1.f·2**E  =>  the nearest power of two to |x|/scale is 2**E, since
        # the midpoints between 2**(E-1), 2**E, 2**(E+1) are 0.75·2**E and 1.5·2**E.
        f = (4.0 / 3.0) / sc_s.float()
        for s, e in blocks.chunks():
            m = e - s
            y = self._work("q", m, torch.float32, dev)
            for (xv, sl), (yv, _) in zip(blocks.views(x[s:e], s, e), blocks.views(y, s, e)):
                torch.mul(xv, f[sl, None], out=yv)
            # All in int32 on the bits of y: contiguous integer ops vectorise, comparisons into
            # bool masks and masked_fill_ do not (5-30x slower on CPU).
            yi = y.view(torch.int32)
            code = self._work("code", m, torch.int32, dev)
            torch.bitwise_right_shift(yi, 28, out=code).bitwise_and_(8)  # the sign bit, as code bit 3
            yi.bitwise_and_(0x7FFFFFFF)  # |y|
            zero = self._work("zero", m, torch.int32, dev)
            torch.sub(yi, _F32_BITS_1_96, out=zero).bitwise_right_shift_(31)  # -1 where |x|/scale < 1/128
            yi.clamp_min_(_F32_BITS_2_M6).bitwise_right_shift_(23).sub_(120)  # biased exponent − 120 = e, 1..7
            code.bitwise_or_(yi.bitwise_and_(zero.bitwise_not_()))
            self._store_int_codes(code, s, p.codes)

    def _dequantize(self, p: Payload, out: torch.Tensor, blocks: Blocks) -> None:
        dev = p.codes.device
        table = self._lut("e3m0", dev, lambda: e3m0_table(dev))
        sc = p.meta.float()
        if native.usable(p.codes, out):  # the 16 levels times each block's scale: the same products
            tables = self._work("tables", blocks.nb * 16, torch.float32, dev).view(blocks.nb, 16)
            torch.mul(sc[:, None], table, out=tables)
            native.lut_decode(p.codes, tables, blocks.B, 4, out)
            return
        for s, e in blocks.chunks():
            codes = self._work("ids", e - s, torch.int32, dev)
            unpack_into(self._packed(p.codes, s, e), 4, codes, self._scratch_fn(dev))
            oc = torch.index_select(table, 0, codes, out=out[s:e])
            for ov, sl in blocks.views(oc, s, e):
                ov.mul_(sc[sl, None])
