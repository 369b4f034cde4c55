"""SparseLoCo-style compressor "sparse": per-chunk top-k, 2-bit values, packed local indices."""
from __future__ import annotations

import math

import pytest
import torch

from streaming_muloco import compression
from streaming_muloco.compression import METHODS, Payload
from streaming_muloco.compressors import make_compressor
from streaming_muloco.error_feedback import ErrorFeedback
from streaming_muloco.quantizers import Blocks
from streaming_muloco.sparse import SparseQuantizer, _group_size, pack_uints, unpack_uints


pytestmark = pytest.mark.usefixtures("kernel_path")  # every test: fused C selection and numpy path


def sparse(block: int = 4096, frac: float = 0.01, **kw: object) -> SparseQuantizer:
    c = make_compressor("sparse", 2, block, frac, **kw)
    assert isinstance(c, SparseQuantizer)
    return c


def data(n: int, seed: int = 0) -> torch.Tensor:
    """Continuous values of varied scale (no ties), so the top-k set is unique."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).add_(0.1) * 3


def chunks(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def expected_nbytes(n: int, block: int, frac: float) -> int:
    k = lambda m: 0 if m == 0 else min(m, max(1, math.ceil(frac * m - 1e-9)))  # noqa: E731
    kk = sum(k(e - s) for s, e in chunks(n, block))
    w = max(1, math.ceil(math.log2(block))) if block > 1 else 1
    return math.ceil(kk / 4) + 2 * 2 * math.ceil(n / block) + math.ceil(kk * w / 8)


# -- wire size --------------------------------------------------------------------------------
@pytest.mark.parametrize("block,frac", [(4096, 0.01), (1024, 0.03), (1000, 0.02), (64, 0.05), (1, 0.5),
                                        (4099, 0.01)])
@pytest.mark.parametrize("n", [0, 1, 5, 63, 64, 1000, 4095, 4096, 4097, 12345, 3 * 4096])
def test_payload_size_is_block_layout_and_known_from_numel_alone(block: int, frac: float, n: int) -> None:
    c = sparse(block, frac)
    p = c.compress(data(n))
    assert p.nbytes == c.payload_nbytes(n) == expected_nbytes(n, block, frac)
    assert p.to_flat_bytes().numel() == p.nbytes
    assert c.layout(n) == c.block_layout(n, block)
    assert p.codes.dtype == torch.uint8 and p.indices.dtype == torch.uint8 and p.meta.dtype == torch.bfloat16


def test_bits_per_element_of_the_default_is_fraction_times_2_plus_log2_b_plus_meta() -> None:
    c = sparse()
    n = 2**24
    bits = c.bits_per_element(n)
    k = math.ceil(0.01 * 4096)
    assert bits == pytest.approx((k * (2 + 12) + 32) / 4096, rel=1e-4)
    assert 0.14 < bits < 0.15  # ~216x smaller than fp32
    assert c.payload_nbytes(n) == expected_nbytes(n, 4096, 0.01)


# -- selection --------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu_chunk", [None, 3000])  # 3000: chunk edges that are not block edges
@pytest.mark.parametrize("block,frac,n", [(4096, 0.01, 5 * 4096 + 777), (4096, 0.03, 3 * 4096), (1024, 0.01, 9000),
                                          (1000, 0.02, 4500), (4099, 0.01, 9000), (64, 0.05, 1000),
                                          (2048, 0.2, 5000), (4096, 1.0, 5000), (4096, 0.01, 1000)])
def test_each_chunk_keeps_exactly_its_top_k_positions(block: int, frac: float, n: int, cpu_chunk: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_chunk is not None:
        monkeypatch.setattr(compression, "CPU_CHUNK", cpu_chunk)
    c = sparse(block, frac)
    x = data(n, seed=block)
    y = c.decompress(c.compress(x))
    for s, e in chunks(n, block):
        k = c.k(e - s)
        top = set((torch.topk(x[s:e].abs(), k).indices + s).tolist())
        assert set(torch.nonzero(y[s:e]).view(-1).add(s).tolist()) == top, (s, e)


def test_grouped_selection_is_used_in_the_target_regime() -> None:
    assert _group_size(4096, 41) == 8 and _group_size(1024, 11) == 8 and _group_size(4096, 123) == 4
    assert _group_size(4099, 41) == 1 and _group_size(256, 3) == 1  # prime length, short chunk: plain top-k


@pytest.mark.parametrize("block,frac", [(4096, 0.01), (64, 0.1)])
def test_ties_and_zeros_keep_a_top_k_multiset(block: int, frac: float) -> None:
    """Integer-valued data (many ties) and chunks with fewer nonzeros than k."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (3 * block + 100,), generator=g).float()
    x[block:2 * block] = 0
    x[block + 5], x[block + 17] = 2.0, -7.0  # 2 nonzeros in a chunk that keeps more
    c = sparse(block, frac)
    p = c.compress(x)
    idx = unpack_uints(p.indices, c.index_bits(block), c.kept(x.numel(), block))
    y = c.decompress(p)
    for ci, (s, e) in enumerate(chunks(x.numel(), block)):
        k = c.k(e - s)
        kept = idx[ci * c.k(block):ci * c.k(block) + k]
        assert kept.unique().numel() == k  # k distinct positions
        assert torch.equal(x[s:e].abs()[kept].sort().values, torch.topk(x[s:e].abs(), k).values.sort().values)
    # Its kept zeros fall in the low half with the 2: they decode to the low level, the mean of that
    # half (the sum of its magnitudes is what is sent), and error feedback takes the difference back.
    mid = y[block:2 * block]
    assert mid[17] < -6 and mid[5] > 0 and (mid != 0).sum() == c.k(block)
    assert mid.abs().sum() == pytest.approx(9.0, rel=1e-2)


# -- values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("meta_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kept_values_have_the_sign_and_a_two_level_magnitude_within_half_the_range(meta_dtype: torch.dtype) -> None:
    block, n = 1024, 10 * 1024 + 300
    c = sparse(block, 0.03, meta_dtype=meta_dtype)
    x = data(n, seed=7)
    y = c.decompress(c.compress(x))
    rel = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-6}[meta_dtype]
    for s, e in chunks(n, block):
        kept = torch.nonzero(y[s:e]).view(-1) + s
        xa = x[kept].abs()
        t, m = xa.min(), xa.max()
        assert torch.equal(torch.sign(y[kept]), torch.sign(x[kept]))
        assert y[kept].abs().unique().numel() <= 2
        assert ((y[kept] - x[kept]).abs() <= (m - t) / 2 + rel * m).all()


def test_each_magnitude_level_keeps_the_sum_of_its_half() -> None:
    c = sparse(4096, 0.02, meta_dtype=torch.float32)
    x = data(4096, seed=1)
    y = c.decompress(c.compress(x))
    kept = y != 0
    xa, ya = x[kept].abs(), y[kept].abs()
    mid = (xa.min() + xa.max()) / 2
    for half in (xa >= mid, xa < mid):
        assert ya[half].sum() == pytest.approx(xa[half].sum().item(), rel=1e-5)


def test_all_zero_and_constant_chunks() -> None:
    block = 256
    x = torch.cat([torch.zeros(block), torch.full((block,), 0.75), torch.full((block,), -3.0), data(block),
                   torch.zeros(10)])
    c = sparse(block, 0.05)
    y = c.decompress(c.compress(x))
    k = c.k(block)
    assert torch.equal(y[:block], torch.zeros(block))
    assert torch.equal(y[block:2 * block][y[block:2 * block] != 0], torch.full((k,), 0.75))
    assert torch.equal(y[2 * block:3 * block][y[2 * block:3 * block] != 0], torch.full((k,), -3.0))
    assert (y[3 * block:4 * block] != 0).sum() == k
    assert torch.equal(y[4 * block:], torch.zeros(10))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_compressed_as_its_fp32_value(dtype: torch.dtype) -> None:
    x = data(5000, seed=2).to(dtype)
    c = sparse(1024, 0.02)
    p = c.compress(x)
    assert torch.equal(p.to_flat_bytes(), c.compress(x.float()).to_flat_bytes())
    y = c.decompress(p)
    assert y.dtype == torch.float32 and (y != 0).sum() == sum(c.k(e - s) for s, e in chunks(5000, 1024))


# -- determinism and the wire -----------------------------------------------------------------
def test_compress_and_decompress_are_deterministic() -> None:
    x = data(3 * 4096 + 5, seed=4)
    a, b = sparse(), sparse()
    pa, pb = a.compress(x), b.compress(x)
    assert torch.equal(pa.to_flat_bytes(), pb.to_flat_bytes())
    assert torch.equal(pa.to_flat_bytes(), a.compress(x).to_flat_bytes())  # warm scratch: same bytes
    assert torch.equal(a.decompress(pa), b.decompress(pb))
    assert torch.equal(a.decompress(pa), a.decompress(pa))


def test_round_trip_through_flat_bytes_and_unflatten() -> None:
    n = 2 * 4096 + 1234
    c = sparse(4096, 0.03)
    x = data(n, seed=5)
    p = c.compress(x)
    buf = p.to_flat_bytes()
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == c.payload_nbytes(n)
    gathered = torch.cat([torch.zeros(3, dtype=torch.uint8), buf.clone()])[3:]  # a misaligned slice
    for b in (buf.clone(), gathered):
        q = c.unflatten(b, n)
        assert torch.equal(c.decompress(q), c.decompress(p))
    out = torch.full((n,), 9.0)
    assert torch.equal(c.decompress(p, out=out), c.decompress(p))


def test_a_payload_from_another_config_is_rejected() -> None:
    p = sparse(4096).compress(data(5000))
    with pytest.raises(ValueError, match="same compression config"):
        sparse(1024).decompress(p)
    with pytest.raises(ValueError, match="payload buffer must be 1-D uint8"):
        sparse(4096, 0.02).unflatten(p.to_flat_bytes(), 5000)


# -- error feedback ---------------------------------------------------------------------------
def test_error_feedback_sends_everything_eventually() -> None:
    n = 3 * 4096 + 100
    c = sparse(4096, 0.02)
    ef = ErrorFeedback(beta=1.0)
    g = torch.Generator().manual_seed(6)
    total_in = torch.zeros(n, dtype=torch.float64)
    total_sent = torch.zeros(n, dtype=torch.float64)
    for _ in range(6):
        delta = torch.randn(n, generator=g) * 0.01
        payload, sent = ef.step(delta, c)
        assert torch.equal(sent, c.decompress(payload))
        assert (sent != 0).sum() <= c.kept(n, 4096)
        total_in += delta.double()
        total_sent += sent.double()
    assert ef.residual is not None
    torch.testing.assert_close(total_sent + ef.residual.double(), total_in, atol=1e-6, rtol=0)
    assert ef.residual.abs().max() < total_in.abs().max() * 6  # bounded, not blowing up


# -- geometry from `blocks` only ----------------------------------------------------------------
@pytest.mark.parametrize("other", [300, 4096, 5000])
def test_quantize_follows_the_blocks_it_is_given(other: int) -> None:
    """A wrapper calls the hooks with its own block sizes (e.g. a parameter's row length)."""
    c = sparse(1024, 0.03)
    n = 2 * other + 77
    x = data(n, seed=other)
    layout = c.block_layout(n, other)
    nbytes = sum(m * torch.empty(0, dtype=dt).element_size() for _, dt, m in layout)
    p = Payload.from_flat_bytes(torch.empty(nbytes, dtype=torch.uint8), layout, method=c.method, numel=n,
                                bits=c.bits, block_size=c.block_size)
    c._quantize(x, p, Blocks(n, other, x.device))
    y = torch.empty(n)
    c._dequantize(p, y, Blocks(n, other, x.device))
    assert torch.equal(y, sparse(other, 0.03).decompress(sparse(other, 0.03).compress(x)))
    for s, e in chunks(n, other):
        top = set((torch.topk(x[s:e].abs(), c.k(e - s)).indices + s).tolist())
        assert set((torch.nonzero(y[s:e]).view(-1) + s).tolist()) == top


def test_pieces_cut_at_a_multiple_of_the_alignment_decode_like_the_whole() -> None:
    c = sparse(1024, 0.02)
    assert c.alignment == 1024
    x = data(5 * 1024 + 300, seed=8)
    whole = c.decompress(c.compress(x))
    for cut in (1024, 3 * 1024, 5 * 1024):
        pieces = torch.cat([c.decompress(c.compress(x[:cut])), c.decompress(c.compress(x[cut:]))])
        assert torch.equal(pieces, whole)


# -- index packing ----------------------------------------------------------------------------
@pytest.mark.parametrize("w", list(range(1, 25)) + [31])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_uints_round_trips_in_ceil_n_w_over_8_bytes(w: int, n: int) -> None:
    vals = torch.randint(0, 2**w, (n,), generator=torch.Generator().manual_seed(w * 1000 + n))
    out = torch.empty(math.ceil(n * w / 8), dtype=torch.uint8)
    pack_uints(vals, w, out)
    assert torch.equal(unpack_uints(out, w, n), vals)


def test_pack_uints_is_an_lsb_first_bit_stream() -> None:
    out = torch.empty(3, dtype=torch.uint8)
    assert pack_uints(torch.tensor([0xABC, 0x123]), 12, out).tolist() == [0xBC, 0x3A, 0x12]
    out = torch.empty(2, dtype=torch.uint8)
    assert pack_uints(torch.tensor([1, 0, 1, 1, 0]), 3, out).tolist() == [1 | 1 << 6, 1 << 1]
    with pytest.raises(ValueError, match="take 3 bytes, not 4"):
        pack_uints(torch.tensor([1, 2]), 12, torch.empty(4, dtype=torch.uint8))


# -- configuration ----------------------------------------------------------------------------
def test_sparse_is_a_method_built_by_the_factory() -> None:
    assert "sparse" in METHODS
    c = make_compressor("sparse", bits=2, block_size=4096, topk_fraction=0.01)
    assert isinstance(c, SparseQuantizer) and c.name == "sparse" and c.fraction == 0.01
    assert (c.bits, c.block_size, c.meta_dtype) == (2, 4096, torch.bfloat16)
    assert SparseQuantizer().block_size == 4096


@pytest.mark.parametrize("kwargs,match", [
    ({"topk_fraction": 0.0}, r"topk_fraction \(0.0\) must be in \(0, 1\]"),
    ({"topk_fraction": -0.1}, r"topk_fraction \(-0.1\) must be in \(0, 1\]"),
    ({"topk_fraction": 1.5}, r"topk_fraction \(1.5\) must be in \(0, 1\]"),
    ({"topk_fraction": math.nan}, r"topk_fraction \(nan\) must be in \(0, 1\]"),
    ({"topk_fraction": "0.01"}, r"topk_fraction \(0.01\) must be in \(0, 1\]"),
    ({"topk_fraction": True}, r"topk_fraction \(True\) must be in \(0, 1\]"),
    ({"block_size": 0}, r"block_size \(0\) must be an integer >= 1"),
    ({"block_size": -4}, r"block_size \(-4\) must be an integer >= 1"),
    ({"block_size": 2.5}, r"block_size \(2.5\) must be an integer >= 1"),
    ({"bits": 4}, r"bits \(4\) must be 2 for method 'sparse'"),
    ({"meta_dtype": torch.int8}, r"meta_dtype \(torch.int8\) must be"),
])
def test_bad_configuration_is_explained(kwargs: dict, match: str) -> None:
    args = {"method": "sparse", "bits": 2, "block_size": 4096, "topk_fraction": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_compressor(**args)
