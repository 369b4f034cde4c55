"""Quantizer error bounds, wire sizes and bit packing (single process, CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch

from streaming_muloco import compression
from streaming_muloco.compression import (
    METHODS,
    Compressor,
    Payload,
    has_nonfinite,
    pack_bits,
    unpack_bits,
)
from streaming_muloco.compressors import make_compressor
from streaming_muloco.quantizers import Blocks, e3m0_table, round_down, round_up

ALL = [("none", 8), ("linear", 8), ("linear", 4), ("linear", 2), ("statistical", 8), ("statistical", 4),
       ("statistical", 2), ("e3m0", 4), ("topk", 8)]
ALL_IDS = [f"{m}{b}" for m, b in ALL]
SIZES = [0, 1, 7, 64, 1000, 4099]


def comp(method: str, bits: int, block: int = 64, frac: float = 0.05, **kw: object) -> Compressor:
    return make_compressor(method, bits, block, frac, **kw)


def blocks_of(x: torch.Tensor, b: int) -> list[torch.Tensor]:
    return list(x.split(b))


# -- bit packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1001])
def test_pack_then_unpack_returns_the_codes_exactly(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_puts_the_first_code_in_the_lowest_bits() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 12, 7], dtype=torch.uint8), 4).tolist() == [5 | 12 << 4, 7]


def test_pack_rejects_bits_that_do_not_divide_a_byte() -> None:
    with pytest.raises(ValueError, match=r"bits \(3\) must be 2, 4 or 8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)


# -- wire size --------------------------------------------------------------------------------
@pytest.mark.parametrize("method,bits", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_nbytes_is_the_tensor_bytes_and_known_from_numel_alone(method: str, bits: int, n: int) -> None:
    c = comp(method, bits)
    p = c.compress(torch.randn(n))
    tensor_bytes = sum(t.numel() * t.element_size() for t in (p.codes, p.meta, p.indices))
    flat = p.to_flat_bytes()
    assert p.nbytes == tensor_bytes == c.payload_nbytes(n) == flat.numel()
    assert flat.dtype == torch.uint8 and flat.dim() == 1


@pytest.mark.parametrize("method,bits", ALL, ids=ALL_IDS)
def test_flat_bytes_round_trip_decodes_identically_even_from_a_misaligned_slice(method: str, bits: int) -> None:
    c, n = comp(method, bits), 1000
    x = torch.randn(n)
    p = c.compress(x)
    direct = c.decompress(p)
    gathered = torch.cat([torch.zeros(3, dtype=torch.uint8), p.to_flat_bytes().clone()])  # rank 1's offset
    assert torch.equal(c.decompress(c.unflatten(gathered[3:], n)), direct)


@pytest.mark.parametrize("method,bits", ALL, ids=ALL_IDS)
def test_decompress_into_a_given_buffer_matches_a_fresh_one(method: str, bits: int) -> None:
    c = comp(method, bits)
    p = c.compress(torch.randn(777))
    out = torch.full((777,), math.nan)
    assert c.decompress(p, out=out) is out
    assert torch.equal(out, c.decompress(p))
    with pytest.raises(ValueError, match=r"out must be a contiguous fp32 tensor of shape \(777,\)"):
        c.decompress(p, out=torch.empty(776))


def test_unflatten_rejects_a_buffer_of_the_wrong_size() -> None:
    c = comp("linear", 2)
    with pytest.raises(ValueError, match=r"must be 1-D uint8 of \d+ bytes"):
        c.unflatten(torch.zeros(c.payload_nbytes(100) + 1, dtype=torch.uint8), 100)


def test_decompress_rejects_a_payload_made_with_another_config() -> None:
    p = comp("linear", 4).compress(torch.randn(10))
    with pytest.raises(ValueError, match="every rank must use the same compression config"):
        comp("linear", 2).decompress(p)


def test_two_bit_linear_with_block_256_and_2_byte_meta_is_about_15x_smaller() -> None:
    n = 2**16
    ratio = 4 * n / comp("linear", 2, block=256).payload_nbytes(n)
    assert 15.0 < ratio < 15.1  # 2 bits + 2·16 bits / 256 per element
    assert 14.2 < 4 * n / comp("linear", 2, block=256, meta_dtype=torch.float32).payload_nbytes(n) < 14.3


def test_topk_sends_k_fp32_values_and_int32_indices_with_k_fixed_by_numel() -> None:
    c = comp("topk", 8, frac=0.07)
    assert [c.k(n) for n in (0, 1, 10, 100, 101)] == [0, 1, 1, 7, 8]
    assert c.payload_nbytes(100) == 7 * (4 + 4)


# -- error bounds -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_metadata_rounding_never_crosses_the_value_and_keeps_exact_ones(dtype: torch.dtype) -> None:
    top = 6e4 if dtype == torch.float16 else 1e38
    v = torch.cat([(torch.randn(20000) * torch.logspace(-40, 38, 20000)).clamp(-top, top),
                   torch.tensor([0.0, 1e-45, -1e-45, 1.0, -0.375])])
    down, up = round_down(v, dtype), round_up(v, dtype)
    assert down.dtype == up.dtype == dtype
    assert torch.all(down.float() <= v) and torch.all(up.float() >= v)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    exact = v.to(dtype).float() == v
    assert torch.equal(down.float()[exact], v[exact]) and torch.equal(up.float()[exact], v[exact])
    normal = v.abs() > torch.finfo(dtype).tiny
    assert torch.all((v - down.float())[normal].abs() <= v[normal].abs() * 2.5 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("meta_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_error_is_at_most_half_a_step_per_block(bits: int, meta_dtype: torch.dtype) -> None:
    block, levels = 64, 2**bits - 1
    x = torch.randn(1000) * torch.rand(1000) * 3  # blocks with different ranges, and a 40-element tail
    c = comp("linear", bits, block, meta_dtype=meta_dtype)
    p = c.compress(x)
    xh = c.decompress(p)
    lo, scale = p.meta.float().view(2, -1)
    for i, (xb, hb) in enumerate(zip(blocks_of(x, block), blocks_of(xh, block))):
        assert (xb - hb).abs().max() <= scale[i] / 2 * (1 + 1e-5) + 1e-7
        # the stored scale is (max - min)/levels, up to rounding of the 2-byte metadata
        exact = (xb.max() - xb.min()) / levels
        slack = 1e-6 if meta_dtype == torch.float32 else 2**-6
        assert scale[i] <= exact * (1 + slack) + xb.abs().max() * slack / levels + 1e-30


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_codes_are_the_packed_nearest_levels(bits: int) -> None:
    block = 64
    x = torch.randn(300)
    c = comp("linear", bits, block, meta_dtype=torch.float32)
    p = c.compress(x)
    lo, scale = p.meta.view(2, -1)
    t = (x - lo.repeat_interleave(block)[:300]) / scale.repeat_interleave(block)[:300]
    codes = unpack_bits(p.codes, bits, 300).float()
    near_tie = (t - t.floor() - 0.5).abs() < 1e-4
    assert torch.all((codes == torch.floor(t + 0.5)) | near_tie)


@pytest.mark.parametrize("x", [torch.full((100,), 1e4) + torch.randn(100) * 1e-3,  # large offset
                               torch.randn(100) * 1e-30,  # tiny values
                               torch.cat([torch.zeros(64), torch.randn(36) * 1e6])])
def test_linear_bound_holds_for_offsets_tiny_and_huge_values(x: torch.Tensor) -> None:
    c = comp("linear", 2, 64)
    p = c.compress(x)
    xh = c.decompress(p)
    scale = p.meta.float().view(2, -1)[1].repeat_interleave(64)[:100]
    assert torch.isfinite(xh).all()
    assert torch.all((x - xh).abs() <= scale / 2 * (1 + 1e-5) + 1e-38)


def test_e3m0_table_is_signed_powers_of_two_and_zero() -> None:
    t = e3m0_table(torch.device("cpu")).tolist()
    mags = [0.0] + [2.0**-j for j in range(6, -1, -1)]
    assert t[:8] == mags and t[8:] == [-m for m in mags]


def test_e3m0_decodes_every_value_to_its_nearest_level() -> None:
    block = 64
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)[torch.randperm(1000)]
    c = comp("e3m0", 4, block)
    p = c.compress(x)
    xh = c.decompress(p)
    scale = p.meta.float().repeat_interleave(block)[:1000]
    levels = e3m0_table(torch.device("cpu"))[None, :] * scale[:, None]  # (n, 16)
    best = (x[:, None] - levels).abs().min(dim=1).values
    assert torch.all((x - xh).abs() <= best + 1e-6 * scale)
    assert torch.all((xh[:, None] == levels).any(dim=1))
    for xb, s in zip(blocks_of(x, block), p.meta.float()):
        assert xb.abs().max() <= s <= xb.abs().max() * (1 + 2**-6)  # absmax, rounded up (<= 2 bf16 ulps)


def _statistical_reference(x: torch.Tensor, codes: torch.Tensor, block: int, bits: int,
                           clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow per-block loops: the reference bins and, from the given codes, the bin means."""
    nbins = 2**bits
    ref_bins, recon = torch.empty_like(codes), torch.empty_like(x)
    for start in range(0, x.numel(), block):
        xb, cb = x[start:start + block].double(), codes[start:start + block]
        mu, sigma = xb.mean(), xb.std(unbiased=False)
        t = (xb - mu) / (2 * clip * sigma / nbins) + nbins / 2
        ref_bins[start:start + block] = t.floor().clamp(0, nbins - 1).to(codes.dtype)
        for j in range(nbins):
            sel = cb == j
            if sel.any():
                recon[start:start + block][sel] = xb[sel].mean().float()
    return ref_bins, recon


@pytest.mark.parametrize("bits,clip", [(2, 6.0), (4, 6.0), (2, 1.0), (4, 2.0)])
def test_statistical_reconstructs_each_bin_as_the_mean_of_its_values(bits: int, clip: float, kernel_path: str) -> None:
    block, n = 64, 300
    x = torch.randn(n) + torch.linspace(-2, 2, n)
    c = comp("statistical", bits, block, stat_clip=clip, meta_dtype=torch.float32)
    p = c.compress(x)
    codes = unpack_bits(p.codes, bits, n)
    ref_bins, ref_recon = _statistical_reference(x, codes, block, bits, clip)
    assert (codes != ref_bins).float().mean() < 0.01  # only values on a bin edge may differ
    torch.testing.assert_close(c.decompress(p), ref_recon, rtol=1e-5, atol=1e-6)


def test_statistical_empty_bins_carry_finite_centres(kernel_path: str) -> None:
    x = torch.tensor([-1.0, 1.0] * 32)  # two values: at 4 bits most bins are empty
    c = comp("statistical", 4, 64, meta_dtype=torch.float32)
    p = c.compress(x)
    assert torch.isfinite(p.meta).all()
    torch.testing.assert_close(c.decompress(p), x)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [64, 256, 1000])
def test_statistical_codes_and_bin_means_match_a_per_block_reference(bits: int, block: int, kernel_path: str) -> None:
    """Per block (and the tail block): code = the bin of mean ± clip·σ a value falls in (end bins
    open), meta = the mean of the values with each code, or the bin's centre when none has it."""
    nbins, clip = 2**bits, 6.0
    g = torch.Generator().manual_seed(block + bits)
    n = 5 * block + block // 3 + 1
    x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) * 3 + 0.1) + 0.5
    x[::17] *= 40  # outliers beyond ±clip·σ of most blocks: the end bins
    c = comp("statistical", bits, block, stat_clip=clip, meta_dtype=torch.float32)
    p = c.compress(x)
    codes, means = unpack_bits(p.codes, bits, n).long(), p.meta.view(-1, nbins).double()
    for b, start in enumerate(range(0, n, block)):
        xb, cb = x[start:start + block].double(), codes[start:start + block]
        mu, width = xb.mean(), 2 * clip * xb.std(unbiased=False) / nbins
        t = (xb - mu) / width + nbins / 2
        ref = t.floor().clamp(0, nbins - 1).long()
        off_edge = (t - t.round()).abs() > 1e-4  # fp32 rounding may only move values on a bin edge
        assert torch.equal(cb[off_edge], ref[off_edge]) and (cb - ref).abs().max() <= 1
        want = torch.stack([xb[cb == j].mean() if (cb == j).any() else mu + (j + 0.5 - nbins / 2) * width
                            for j in range(nbins)])
        torch.testing.assert_close(means[b], want, rtol=1e-5, atol=1e-6 * xb.abs().max().item())
    assert torch.equal(c.decompress(p).double(), means[torch.arange(n) // block, codes])


@pytest.mark.parametrize("other", [64, 1000])
@pytest.mark.parametrize("method,bits", [("statistical", 2), ("statistical", 4), ("e3m0", 4)])
def test_block_quantizers_follow_the_blocks_they_are_given(method: str, bits: int, other: int, kernel_path: str) -> None:
    """A wrapper (segments.py) calls the hooks with its own block size, e.g. a row length."""
    c, ref = comp(method, bits, 256), comp(method, bits, other)
    n = 3 * other + 37
    x = torch.randn(n, generator=torch.Generator().manual_seed(other))
    layout = c.block_layout(n, other)
    nbytes = sum(m * torch.empty(0, dtype=dt).element_size() for _, dt, m in layout)
    p = Payload.from_flat_bytes(torch.empty(nbytes, dtype=torch.uint8), layout, method=c.method, numel=n,
                                bits=c.bits, block_size=other)
    c._quantize(x, p, Blocks(n, other, x.device))
    y = torch.empty(n)
    c._dequantize(p, y, Blocks(n, other, x.device))
    assert torch.equal(p.to_flat_bytes(), ref.compress(x).to_flat_bytes())
    assert torch.equal(y, ref.decompress(ref.compress(x)))


@pytest.mark.parametrize("block", [5, 64, 256])
@pytest.mark.parametrize("method,bits", [m for m in ALL if m[0] not in ("none", "topk")], ids=ALL_IDS[1:-1])
def test_cache_sized_chunks_give_the_same_payload_as_one_pass(method: str, bits: int, block: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3001)  # a tail block for every block size
    c = comp(method, bits, block)
    whole = c.compress(x)
    monkeypatch.setattr(compression, "CPU_CHUNK", 100)  # many chunks, and the last one short
    chunked = comp(method, bits, block).compress(x)
    assert torch.equal(chunked.to_flat_bytes(), whole.to_flat_bytes())
    assert torch.equal(comp(method, bits, block).decompress(chunked), c.decompress(whole))


# -- alignment: where a vector may be cut (two-phase chunks) ----------------------------------
BLOCK_METHODS = ("linear", "statistical", "e3m0")
EXACT_PIECES = [m for m in ALL if m[0] != "topk"]  # top-k keeps the k largest of each piece: never exact


def _whole_and_pieces(c: Compressor, x: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x decoded after compressing it whole, and after compressing x[:cut] and x[cut:] apart."""
    pieces = torch.cat([c.decompress(c.compress(x[:cut])), c.decompress(c.compress(x[cut:]))])
    return c.decompress(c.compress(x)), pieces


@pytest.mark.parametrize("cpu_chunk", [None, 100])  # 100: chunk edges of the pieces and the whole differ
@pytest.mark.parametrize("block", [5, 64])
@pytest.mark.parametrize("method,bits", EXACT_PIECES, ids=[f"{m}{b}" for m, b in EXACT_PIECES])
def test_pieces_cut_at_a_multiple_of_alignment_decode_exactly_like_the_whole(
        method: str, bits: int, block: int, cpu_chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_chunk is not None:
        monkeypatch.setattr(compression, "CPU_CHUNK", cpu_chunk)
    c = comp(method, bits, block)
    assert c.alignment == (block if method in BLOCK_METHODS else 1)
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3001, generator=g) * torch.rand(3001, generator=g) * 4  # and a tail block
    for k in (1, 3, 17, 46):
        whole, pieces = _whole_and_pieces(c, x, k * c.alignment)
        assert torch.equal(pieces, whole), f"cut at {k}·{c.alignment}"


@pytest.mark.parametrize("method,bits", [("linear", 2), ("statistical", 2), ("e3m0", 4)])
def test_a_cut_inside_a_block_changes_the_decode(method: str, bits: int) -> None:
    c = comp(method, bits, 64)
    x = torch.randn(3001, generator=torch.Generator().manual_seed(0))
    whole, pieces = _whole_and_pieces(c, x, 5 * c.alignment + 32)  # block 5 is split; later blocks shift
    assert torch.equal(pieces[:5 * 64], whole[:5 * 64])  # the blocks before the cut are untouched
    assert not torch.equal(pieces, whole)


# -- degenerate inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("method,bits", ALL, ids=ALL_IDS)
def test_empty_and_all_zero_tensors_round_trip_without_nan(method: str, bits: int) -> None:
    c = comp(method, bits)
    assert c.decompress(c.compress(torch.zeros(0))).shape == (0,)
    z = torch.zeros(1000)
    assert torch.equal(c.decompress(c.compress(z)), z)


@pytest.mark.parametrize("method,bits", [m for m in ALL if m[0] != "topk"], ids=ALL_IDS[:-1])
def test_constant_blocks_decode_finite_and_close(method: str, bits: int) -> None:
    x = torch.cat([torch.full((64,), 0.3), torch.full((64,), -7.1e-5), torch.full((36,), 2.5e3)])
    c = comp(method, bits, 64)
    xh = c.decompress(c.compress(x))
    assert torch.isfinite(xh).all()
    torch.testing.assert_close(xh, x, rtol=2**-7, atol=0)


def test_constant_blocks_decode_exactly_with_fp32_linear_meta() -> None:
    x = torch.cat([torch.full((64,), 0.3), torch.full((64,), -7.1e-5)])
    c = comp("linear", 2, 64, meta_dtype=torch.float32)
    assert torch.equal(c.decompress(c.compress(x)), x)


@pytest.mark.parametrize("n", [1000, 2**19 + 5])  # the large one takes the sampled path, in 2 chunks
def test_topk_keeps_exactly_the_largest_magnitudes(n: int) -> None:
    x = torch.randperm(n).float().sub_(n / 2) * torch.randn(n).sign()  # distinct magnitudes
    c = comp("topk", 8, frac=0.01)
    p = c.compress(x)
    k = c.k(n)
    want = torch.topk(x.abs(), k).indices
    assert sorted(p.indices.tolist()) == sorted(want.tolist())
    xh = c.decompress(p)
    assert torch.equal(xh[want], x[want]) and int((xh != 0).sum()) == k


def test_topk_is_exact_when_the_sampled_threshold_guess_is_wrong() -> None:
    n = 2**17
    x = torch.rand(n) * 1e-3
    x[:: n // 2**14] = 1.0 + torch.rand(2**14)  # exactly the sampled entries are huge: too few candidates
    p = comp("topk", 8, frac=0.2).compress(x)
    assert sorted(p.indices.tolist()) == sorted(torch.topk(x, math.ceil(0.2 * n)).indices.tolist())


@pytest.mark.parametrize("method,bits", ALL, ids=ALL_IDS)
def test_payload_does_not_alias_the_input(method: str, bits: int) -> None:
    c, x = comp(method, bits), torch.randn(500)
    p = c.compress(x)
    before = c.decompress(p).clone()
    x.mul_(3)
    c.compress(torch.randn(5000))  # reuses the scratch buffers
    assert torch.equal(c.decompress(p), before)


def test_inputs_of_other_float_dtypes_are_compressed_as_fp32() -> None:
    x = torch.randn(200).bfloat16()
    c = comp("linear", 8)
    torch.testing.assert_close(c.decompress(c.compress(x)), x.float(), atol=0.03, rtol=0)


def test_compress_rejects_a_tensor_that_is_not_flat() -> None:
    with pytest.raises(ValueError, match=r"flat 1-D tensor.*reshape\(-1\)"):
        comp("linear", 8).compress(torch.randn(4, 4))


# -- factory and checks -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "linear", "bits": 3}, r"bits \(3\) must be one of \(2, 4, 8\) for method 'linear'"),
    ({"method": "statistical", "bits": 1}, r"bits \(1\) must be one of \(2, 4, 8\) for method 'statistical'"),
    ({"method": "e3m0", "bits": 2}, r"bits \(2\) must be 4 for method 'e3m0'"),
    ({"method": "linear", "block_size": 0}, r"block_size \(0\) must be >= 1"),
    ({"method": "topk", "topk_fraction": 0.0}, r"topk_fraction \(0.0\) must be in \(0, 1\]"),
    ({"method": "topk", "topk_fraction": 1.5}, r"topk_fraction \(1.5\) must be in \(0, 1\]"),
    ({"method": "int8"}, r"unknown compression method 'int8'; choose one of none, linear"),
    ({"method": "linear", "meta_dtype": torch.int8}, r"meta_dtype \(torch.int8\) must be"),
    ({"method": "statistical", "stat_clip": -1.0}, r"clip \(-1.0\) must be a positive number"),
])
def test_make_compressor_explains_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_compressor(**kwargs)


def test_every_method_has_a_compressor_with_its_name() -> None:
    names = {m: make_compressor(m, 2 if m == "sparse" else 4).name for m in METHODS}
    assert names == {"none": "none", "linear": "linear4", "statistical": "statistical4", "e3m0": "e3m0",
                     "topk": "topk", "sparse": "sparse"}


def test_has_nonfinite_detects_nan_and_both_infinities() -> None:
    x = torch.randn(100)
    assert not has_nonfinite(x) and not has_nonfinite(torch.zeros(0))
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[37] = bad
        assert has_nonfinite(y)
