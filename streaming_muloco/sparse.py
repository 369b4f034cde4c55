"""SparseLoCo-style compression: per-chunk top-k, 2-bit values, chunk-local packed indices.

SparseLoCo (Sarfi et al., arXiv 2508.15706) sends, per chunk of a pseudo-gradient, only its k
largest-magnitude entries (1-3 % density), quantizes those values to 2 bits, and keeps what was
not sent in an error-feedback buffer (here `error_feedback.py`). This module is our wire format
for it; the code is our own:

- Chunks are the `Blocks` of the block quantizers: full blocks of B elements plus a partial tail
  of r. A chunk of length L keeps k(L) = max(1, ceil(fraction·L)) entries; the rest decode to 0.
- Each kept value is 2 bits: a sign bit and a magnitude bit. Per chunk the kept magnitudes lie in
  [t, M] (t the k-th largest |x|, M the largest); the magnitude bit says whether |x| >= (t+M)/2,
  and each half is decoded as the mean magnitude of the values that fell into it (two levels in
  `meta_dtype` per chunk, rounded to nearest). So |x − x̂| <= (M − t)/2 plus the metadata
  rounding, and the sum of each half's magnitudes is kept. A chunk with fewer than k nonzeros
  keeps some zeros; they decode to its low level, and error feedback takes that back later.
  (The Templar code behind SparseLoCo bins a tensor's kept values over mean ± c·σ and decodes
  each bin as its mean; top-k values avoid 0 and form two signed tails, so sign + magnitude
  spends 2 bits better, and per-chunk levels follow the scale of each chunk.)
- Indices are local to the chunk, w = ceil(log2 B) bits each (12 for B = 4096), packed LSB-first
  into a continuous bit stream: ceil(K·w/8) bytes for the K kept values of the tensor.

Wire layout for n elements, nf = n // B full chunks and a tail of r = n % B:
K = nf·k(B) + k(r) kept values; codes: ceil(K/4) bytes (2-bit codes, `pack_into` order, chunk
after chunk); meta: (num_chunks, 2) [low, high] magnitude levels in `meta_dtype`; indices:
ceil(K·w/8) bytes. It follows from (n, B, fraction) alone, so every rank knows its size.
Bits per element ≈ fraction·(2 + w) + 2·16/B: 0.148 for B = 4096, fraction 0.01 (216x).

Why B = 4096 by default: with 1 % density the wire cost per element is
k(B)·(2 + log2 B)/B + 32/B, which is 0.242 bits at B = 256 (metadata dominates), 0.160 at 1024,
0.149 at 2048, 0.148 at 4096 and 0.162 at 16384 (indices grow): 4096 is the minimum, and the
larger the chunk the closer its picks come to the global top-k.

Selection is exact per chunk (ties broken arbitrarily). On CPU the fused C kernel of
`native.py` selects, codes and levels each chunk in one call (a radix select on the bit patterns
of |x|, kept indices ascending; docs/design.md §5). Without it: a top-k over whole chunks costs
~4-7 ns per element (torch.topk, numpy.argpartition); instead a chunk of length L is cut into
G = L/g strided groups (group c holds the elements c, c+G, c+2G, ...), whose max |x| takes one
vectorised pass (|x| in L2-sized slices, then amax over the middle dimension). All of the k
largest entries lie in the k groups with the largest maxima (a group whose max reaches the k-th
largest |x| holds one of the k largest, so at most k groups do; ties aside), so the top-k runs
on the G maxima and then on the k·g members of those groups: about 2·sqrt(k·L) elements instead
of L, with g a power of two near 0.8·sqrt(L/k) (8 for 1 % of 4096, 4 for 3 %). The top-k's are
numpy.argpartition on the int32 bit patterns of |x| (ordered like |x|), ~2x faster than
torch.topk. Other devices use torch.topk on whole chunks.

Scratch (reused across calls, freed by `release_scratch`): about 30 bytes per kept value plus
one 512 KiB slice, i.e. ~0.3-0.9 bytes per input element at 1-3 % density.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import native
from .compression import META_DTYPES, Layout, Payload, kept_count, layout_nbytes, make_layout, unpack_into
from .quantizers import Blocks, _BlockQuantizer

__all__ = ["SparseQuantizer", "pack_uints", "unpack_uints"]

_ABS_SLICE = 2**17  # elements of |x| per pass of the group maxima: stays in L2 (~1.3x faster than 2**19)


def _check_fraction(fraction: object) -> float:
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction)
            or not 0.0 < fraction <= 1.0):
        raise ValueError(f"topk_fraction ({fraction}) must be in (0, 1]: the share of each chunk's elements "
                         f"that method 'sparse' sends")
    return float(fraction)


class SparseQuantizer(_BlockQuantizer):
    """Per chunk of `block_size` elements, the k largest |x| as 2-bit values + packed local indices.

    Args:
        block_size: chunk length B (indices take ceil(log2 B) bits).
        topk_fraction: share of each chunk kept, in (0, 1]; k = max(1, ceil(fraction·len)).
        meta_dtype: dtype of the two magnitude levels per chunk.
        bits: bits per kept value; only 2.
    """

    method = "sparse"

    def __init__(self, block_size: int = 4096, topk_fraction: float = 0.01,
                 meta_dtype: torch.dtype = torch.bfloat16, bits: int = 2) -> None:
        if bits != 2:
            raise ValueError(f"bits ({bits}) must be 2 for method 'sparse' (a sign and a magnitude bit per kept value)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size ({block_size}) must be an integer >= 1: the chunk length of method 'sparse'")
        if block_size > 2**31:
            raise ValueError(f"block_size ({block_size}) must be <= 2**31 for method 'sparse'")
        if meta_dtype not in META_DTYPES:
            raise ValueError(f"meta_dtype ({meta_dtype}) must be torch.bfloat16, torch.float16 or torch.float32")
        self.fraction = _check_fraction(topk_fraction)
        super().__init__(2, block_size, meta_dtype, meta_per_block=2)

    def __repr__(self) -> str:
        return (f"SparseQuantizer(block_size={self.block_size}, topk_fraction={self.fraction}, "
                f"meta_dtype={self.meta_dtype})")

    # -- geometry ----------------------------------------------------------------------------
    def k(self, length: int) -> int:
        """Entries kept in a chunk of `length` (the rule of method "topk": `kept_count`)."""
        return kept_count(self.fraction, length)

    @staticmethod
    def index_bits(block_size: int) -> int:
        """Bits of a chunk-local index: ceil(log2 B), at least 1."""
        return max(1, (block_size - 1).bit_length())

    def kept(self, numel: int, block_size: int) -> int:
        """K: the values kept in `numel` elements cut in chunks of `block_size`."""
        nf, r = divmod(numel, block_size)
        return nf * self.k(block_size) + self.k(r)

    def block_layout(self, numel: int, block_size: int) -> Layout:
        nb = -(-numel // block_size)
        kk = self.kept(numel, block_size)
        return make_layout((torch.uint8, -(-kk // 4)), (self.meta_dtype, 2 * nb),
                           (torch.uint8, -(-kk * self.index_bits(block_size) // 8)))

    def bits_per_element(self, numel: int, block_size: int | None = None) -> float:
        """Wire bits per input element (codes + metadata + indices)."""
        b = self.block_size if block_size is None else block_size
        return 8.0 * layout_nbytes(self.block_layout(numel, b)) / max(1, numel)

    # -- encode ------------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor, p: Payload, blocks: Blocks) -> None:
        dev, B, nf, r = x.device, blocks.B, blocks.nf, blocks.r
        kf, kt = self.k(B), self.k(r)
        kk = nf * kf + kt
        idx = self._work("sp_idx", kk, torch.int64, dev)
        if native.usable(x, p.codes, p.meta):  # one fused pass per chunk: selection, codes, levels
            codes = self._code_buffer(kk, dev)
            levels = self._work("sp_lev", 2 * blocks.nb, torch.float32, dev)
            native.sparse_select(x, B, kf, kt, idx, codes, levels)
            p.meta.copy_(levels)  # rounded to nearest in meta_dtype
            self._pack_from(codes, kk, 0, p.codes)
            pack_uints(idx, self.index_bits(B), p.indices)
            return
        val = self._work("sp_val", kk, torch.float32, dev)
        if nf:
            full = x[:nf * B].view(nf, B)
            iv, vv = idx[:nf * kf].view(nf, kf), val[:nf * kf].view(nf, kf)
            g = _group_size(B, kf) if dev.type == "cpu" else 1
            groups = self._work("sp_grp", nf * kf, torch.int64, dev).view(nf, kf) if g > 1 else None
            scratch = self._work("sp_abs", max(B, _ABS_SLICE), torch.float32, dev) if g > 1 else None
            rows = max(1, blocks.chunk // B)
            for r0 in range(0, nf, rows):  # slices of rows: scratch and argpartition output stay small
                r1 = min(nf, r0 + rows)
                if groups is None:
                    _select_direct(full[r0:r1], kf, iv[r0:r1], vv[r0:r1])
                else:
                    _select_grouped(full[r0:r1], kf, g, groups[r0:r1], iv[r0:r1], vv[r0:r1], scratch)
            if groups is not None:  # candidate j·k + i of a row -> its element j·G + groups[i], G = B/g
                i = torch.remainder(iv, kf)
                torch.div(iv, kf, rounding_mode="floor", out=iv)
                iv.mul_(B // g).add_(torch.gather(groups, 1, i))
        if r:
            _select_direct(x[nf * B:].view(1, r), kt, idx[nf * kf:].view(1, kt), val[nf * kf:].view(1, kt))
        self._quantize_values(val, nf, kf, kt, p)
        pack_uints(idx, self.index_bits(B), p.indices)

    def _quantize_values(self, val: torch.Tensor, nf: int, kf: int, kt: int, p: Payload) -> None:
        """2-bit codes (sign << 1 | magnitude bit) and the [low, high] magnitude levels per chunk."""
        kk, dev = val.numel(), val.device
        mag = self._work("sp_mag", kk, torch.float32, dev)
        torch.abs(val, out=mag)
        hi_bit = self._work("sp_bit", kk, torch.bool, dev)
        levels = torch.empty(nf + (1 if kt else 0), 2, device=dev)
        for s, nrows, k, b0 in ((0, nf, kf, 0), (nf * kf, 1 if kt else 0, kt, nf)):
            if not nrows:
                continue
            m = mag[s:s + nrows * k].view(nrows, k)
            bit = hi_bit[s:s + nrows * k].view(nrows, k)
            t, top = torch.aminmax(m, dim=1)
            torch.ge(m, t.add(top).mul_(0.5).unsqueeze(1), out=bit)  # the max always reaches the midpoint
            n_hi = bit.sum(dim=1, dtype=torch.float32)  # >= 1
            n_lo = n_hi.neg().add_(k)
            torch.div(torch.mul(m, bit).sum(dim=1), n_hi, out=levels[b0:b0 + nrows, 1])
            s_lo = torch.mul(m, bit.logical_not()).sum(dim=1)
            torch.where(n_lo > 0, s_lo.div_(n_lo.clamp_min(1.0)), t, out=levels[b0:b0 + nrows, 0])  # empty: t == M
        p.meta.copy_(levels.view(-1))  # rounded to nearest in meta_dtype
        codes = self._code_buffer(kk, dev)
        c = codes[:kk]
        torch.lt(val, 0, out=c.view(torch.bool))  # the sign bit
        c.mul_(2).add_(hi_bit)
        self._pack_from(codes, kk, 0, p.codes)

    # -- decode ------------------------------------------------------------------------------
    def _dequantize(self, p: Payload, out: torch.Tensor, blocks: Blocks) -> None:
        dev, B, nf, r = p.codes.device, blocks.B, blocks.nf, blocks.r
        kf, kt = self.k(B), self.k(r)
        kk = nf * kf + kt
        pos = unpack_uints(p.indices, self.index_bits(B), kk)  # chunk-local, made global below
        code = self._work("sp_code", kk, torch.int64, dev)
        unpack_into(p.codes, 2, code, self._scratch_fn(dev))
        level = torch.bitwise_and(code, 1)  # magnitude bit -> index into the flat (chunks, 2) levels
        if nf:
            chunk = torch.arange(nf, device=dev).unsqueeze(1)
            pos[:nf * kf].view(nf, kf).add_(chunk * B)
            level[:nf * kf].view(nf, kf).add_(chunk * 2)
        if kt:
            pos[nf * kf:].add_(nf * B)
            level[nf * kf:].add_(2 * nf)
        vals = torch.index_select(p.meta.float(), 0, level)
        vals.mul_(code.bitwise_right_shift_(1).mul_(-2).add_(1))  # code >> 1 is the sign bit: ±1
        # Zero and fill the output a slice of chunks at a time, so the scattered writes hit cache.
        rows = max(1, blocks.chunk // B)
        for r0 in range(0, max(nf, 1), rows):
            r1 = min(nf, r0 + rows)
            s, e = r0 * B, (r1 * B if r1 < nf else blocks.n)
            k0, k1 = r0 * kf, (r1 * kf if r1 < nf else kk)
            out[s:e].zero_()
            out.index_put_((pos[k0:k1],), vals[k0:k1])


def _abs_bits(v: torch.Tensor) -> torch.Tensor:
    """|v| as int32 bit patterns (sign bit cleared): ordered like |v| for finite floats."""
    return torch.bitwise_and(v.view(torch.int32), 0x7FFFFFFF)


def _top_k(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(R, k) int64 column indices of the k largest `keys` (R, n) of each row, in no particular
    order. On CPU numpy's introselect (argpartition) runs ~2x faster than torch.topk."""
    n = keys.shape[1]
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argpartition(keys.numpy(), n - k, axis=1)[:, n - k:])
    return torch.topk(keys, k, dim=1, sorted=False).indices


def _select_direct(v: torch.Tensor, k: int, idx_out: torch.Tensor, val_out: torch.Tensor) -> None:
    """idx_out, val_out (R, k) <- the positions and values of the k largest |v| in each row of v (R, L)."""
    idx_out.copy_(_top_k(_abs_bits(v), k))
    torch.gather(v, 1, idx_out, out=val_out)


def _select_grouped(v: torch.Tensor, k: int, g: int, groups_out: torch.Tensor, cand_out: torch.Tensor,
                    val_out: torch.Tensor, scratch: torch.Tensor) -> None:
    """The k largest |v| of each row of v (R, L) found through L/g strided groups: groups_out (R, k)
    <- the k groups with the largest max |x|, cand_out (R, k) <- j·k + i for the element j of
    group groups_out[i] (element j·(L/g) + groups_out[i] of the row), val_out <- its value.
    `scratch`: fp32 work space of at least one row; |v| is taken in slices of its size."""
    rows, n = v.shape
    ng = n // g
    vg = v.view(rows, g, ng)  # group c: the elements c, c + G, c + 2G, ... of a row
    gmax = v.new_empty(rows, ng)
    step = max(1, scratch.numel() // n)
    for r0 in range(0, rows, step):  # |x| in an L2-sized slice, then its max over each group
        r1 = min(rows, r0 + step)
        a = torch.abs(vg[r0:r1], out=scratch[:(r1 - r0) * n].view(r1 - r0, g, ng))
        torch.amax(a, dim=1, out=gmax[r0:r1])
    groups_out.copy_(_top_k(gmax.view(torch.int32), k))
    cand = torch.gather(vg, 2, groups_out.unsqueeze(1).expand(rows, g, k)).view(rows, g * k)
    cand_out.copy_(_top_k(_abs_bits(cand), k))
    torch.gather(cand, 1, cand_out, out=val_out)


def _group_size(n: int, k: int) -> int:
    """Strided group size g for a row of n keeping k, or 1 (plain top-k) when grouping does not pay:
    short rows, more than ~1/16 kept, or no power of two >= 4 dividing n.

    The two selections cost ~n/g and ~k·g, but a candidate (gathered, then selected) costs more than
    a group maximum, so g is the power of two dividing n nearest 0.8·sqrt(n/k) (measured on CPU:
    8 for 1 % of 1024-4096, 4 for 2-3 %)."""
    if n < 512 or 16 * k > n:
        return 1
    g = 1 << max(0, round(math.log2(math.sqrt(n / k)) - 0.35))
    while g > 1 and n % g:
        g //= 2
    return g if g >= 4 and n // g >= 2 * k else 1


# -- packing of w-bit unsigned integers --------------------------------------------------------
def _groups(w: int) -> tuple[int, int]:
    """(values, bytes) of the shortest run of w-bit values that fills whole bytes."""
    per = 8 // math.gcd(w, 8)
    return per, per * w // 8


def _int_type(w: int) -> torch.dtype:
    return torch.int32 if w <= 23 else torch.int64  # a value shifted by up to 7 bits still fits


def pack_uints(vals: torch.Tensor, w: int, out: torch.Tensor) -> torch.Tensor:
    """`out` (uint8, ceil(n·w/8) bytes) <- the n integer values in [0, 2**w), as an LSB-first bit
    stream: value i occupies stream bits i·w .. i·w + w - 1, stream bit j being bit j % 8 of
    byte j // 8 (so 12-bit values a, b take the bytes a & 0xFF, a >> 8 | (b & 0xF) << 4, b >> 4).

    Runs of `per` values fill whole bytes; the work is a few shifts per (value, byte) pair of a
    run, each over all runs at once (contiguous rows of a (per, runs) transpose)."""
    n = vals.numel()
    if out.numel() != -(-n * w // 8):
        raise ValueError(f"{n} values of {w} bits take {-(-n * w // 8)} bytes, not {out.numel()}")
    if n == 0:
        return out
    per, nby = _groups(w)
    runs = -(-n // per)
    dt = _int_type(w)
    v = torch.zeros(runs * per, dtype=dt, device=vals.device)
    v[:n] = vals
    v = v.view(runs, per).t().contiguous()  # (per, runs): value i of every run is one contiguous row
    acc = torch.zeros(nby, runs, dtype=dt, device=vals.device)
    part = torch.empty(runs, dtype=dt, device=vals.device)
    for i in range(per):
        lo = i * w
        for m in range(lo // 8, (lo + w - 1) // 8 + 1):
            sh = lo - 8 * m  # value bit 0 sits at bit `sh` of byte m (negative: below it)
            if sh >= 0:
                torch.bitwise_left_shift(v[i], sh, out=part)
            else:
                torch.bitwise_right_shift(v[i], -sh, out=part)
            acc[m].bitwise_or_(part.bitwise_and_(0xFF))
    return out.copy_(acc.t().reshape(-1)[:out.numel()])  # integer -> uint8 wraps: the low byte


def unpack_uints(packed: torch.Tensor, w: int, n: int) -> torch.Tensor:
    """The n w-bit values in `packed` (the inverse of `pack_uints`), as int64."""
    need = -(-n * w // 8)
    if packed.numel() != need:
        raise ValueError(f"{n} values of {w} bits take {need} bytes, not {packed.numel()}")
    per, nby = _groups(w)
    runs = -(-n // per)
    dt = _int_type(w)
    b = torch.zeros(runs * nby, dtype=dt, device=packed.device)
    b[:need] = packed
    b = b.view(runs, nby).t().contiguous()  # (bytes, runs)
    v = torch.zeros(per, runs, dtype=dt, device=packed.device)
    part = torch.empty(runs, dtype=dt, device=packed.device)
    for i in range(per):
        lo = i * w
        for m in range(lo // 8, (lo + w - 1) // 8 + 1):
            sh = 8 * m - lo  # bit 0 of byte m is value bit `sh` (negative: bits below the value's)
            if sh >= 0:
                torch.bitwise_left_shift(b[m], sh, out=part)
            else:
                torch.bitwise_right_shift(b[m], -sh, out=part)
            v[i].bitwise_or_(part)
    v.bitwise_and_((1 << w) - 1)
    return v.t().reshape(-1)[:n].to(torch.int64)
