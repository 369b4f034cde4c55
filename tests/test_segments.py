"""Parameter-aware compression: segment plans, the segmented payload, two-phase cuts."""
import pytest
import torch

from streaming_muloco.compressors import make_compressor
from streaming_muloco.model import build_model
from streaming_muloco.segments import (
    EMBEDDING, HEAD, MATRIX, VECTOR, ParamExtent, Segment, SegmentedCompressor, compressed_kinds, cut_segments,
    param_kinds, plan_segments,
)

ALL = compressed_kinds("linear", False, True, True)

SHARD = [ParamExtent("emb", EMBEDDING, (256, 64), 0, 256 * 64), ParamExtent("ln", VECTOR, (64,), 0, 64),
         ParamExtent("w", MATRIX, (128, 64), 100, 5000), ParamExtent("b", VECTOR, (128,), 0, 128),
         ParamExtent("head", HEAD, (256, 64), 0, 256 * 64)]


def test_rows_of_each_matrix_are_blocks_and_vectors_travel_as_fp32():
    plan = plan_segments(SHARD, "row", 256, ALL)
    # emb: 256 rows of 64 (one merged segment); ln fp32; w starts at element 100 = 1 row + 36,
    # so the rest of that row (28) is its own block, then rows of 64; b fp32; head rows of 64.
    assert plan == (Segment(0, 16384, 64), Segment(16384, 64, 0), Segment(16448, 28, 28),
                    Segment(16476, 4972, 64), Segment(21448, 128, 0), Segment(21576, 16384, 64))


def test_block_granularity_starts_a_fresh_block_grid_at_every_parameter():
    plan = plan_segments(SHARD[2:4], "block", 256, ALL)
    assert plan == (Segment(0, 5000, 256), Segment(5000, 128, 0))


def test_embedding_and_head_can_go_uncompressed_and_vectors_compressed():
    kinds = compressed_kinds("linear", True, False, False)
    plan = plan_segments(SHARD, "row", 256, kinds)
    # emb fp32, ln compressed (1-D: no rows, so blocks of block_size), w by rows, b compressed,
    # head fp32
    assert plan == (Segment(0, 16384, 0), Segment(16384, 64, 256), Segment(16448, 28, 28),
                    Segment(16476, 4972, 64), Segment(21448, 128, 256), Segment(21576, 16384, 0))


def test_segmented_payload_has_a_fixed_size_and_fp32_segments_arrive_exactly():
    plan = plan_segments(SHARD, "row", 256, ALL)
    c = SegmentedCompressor(make_compressor("linear", 2, 256), plan)
    x = torch.randn(c.numel)
    p = c.compress(x)
    assert p.nbytes == c.payload_nbytes(c.numel) == p.to_flat_bytes().numel()
    y = c.decompress(c.unflatten(p.to_flat_bytes(), c.numel))
    assert torch.equal(y[16384:16448], x[16384:16448]) and torch.equal(y[21448:21576], x[21448:21576])
    # 2 bits per element plus a few bytes of metadata per row, the vectors at 32 bits
    bits_per_elem = 8 * p.nbytes / c.numel
    assert 2.0 < bits_per_elem < 3.0, bits_per_elem


def test_each_row_is_quantized_with_its_own_range():
    """A row of huge values must not widen the scale of its neighbours: per-row min/max."""
    rows = torch.randn(8, 64) * 1e-3
    rows[3] *= 1e6
    plan = plan_segments([ParamExtent("w", MATRIX, (8, 64), 0, 512)], "row", 256, ALL)
    c = SegmentedCompressor(make_compressor("linear", 2, 256, meta_dtype=torch.float32), plan)
    y = c.decompress(c.compress(rows.reshape(-1))).view(8, 64)
    for r in range(8):
        span = rows[r].max() - rows[r].min()
        assert (y[r] - rows[r]).abs().max() <= span / 3 / 2 * 1.001 + 1e-12


def test_a_shifted_buffer_decodes_the_same():
    plan = plan_segments(SHARD, "row", 256, ALL)
    c = SegmentedCompressor(make_compressor("statistical", 2, 256), plan)
    x = torch.randn(c.numel)
    buf = c.compress(x).to_flat_bytes()
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])[1:]  # misaligned view
    assert torch.equal(c.decompress(c.unflatten(shifted, c.numel)), c.decompress(c.unflatten(buf, c.numel)))


def test_wrong_length_input_is_refused_with_the_layout_size():
    c = SegmentedCompressor(make_compressor("linear", 2, 256), plan_segments(SHARD, "row", 256, ALL))
    with pytest.raises(ValueError, match=f"encodes {c.numel} elements"):
        c.compress(torch.zeros(c.numel + 1))


@pytest.mark.parametrize("K", [2, 3, 5])
def test_two_phase_cuts_tile_the_plan_and_pad_with_fp32(K):
    plan = plan_segments(SHARD, "row", 256, ALL)
    n = sum(s.numel for s in plan)
    chunk = -(-n // K)
    for j in range(K):
        cut = cut_segments(plan, j * chunk, (j + 1) * chunk)
        assert cut[0].start == 0 and sum(s.numel for s in cut) == chunk
        assert all(a.start + a.numel == b.start for a, b in zip(cut, cut[1:]))
        c = SegmentedCompressor(make_compressor("linear", 8, 256), cut)
        x = torch.randn(chunk)
        assert c.decompress(c.compress(x)).shape == x.shape
    last = cut_segments(plan, (K - 1) * chunk, K * chunk)
    if K * chunk > n:
        assert last[-1] == Segment(n - (K - 1) * chunk, K * chunk - n, 0)


def test_a_cut_through_a_block_makes_its_pieces_blocks_of_their_own():
    plan = (Segment(0, 640, 64),)
    assert cut_segments(plan, 100, 300) == (Segment(0, 28, 28), Segment(28, 172, 64))


def test_kinds_come_from_the_modules():
    kinds = param_kinds(build_model("tiny"))
    assert kinds["embed.weight"] == EMBEDDING and kinds["lm_head.weight"] == HEAD
    assert kinds["blocks.0.attn_norm.weight"] == VECTOR and kinds["final_norm.weight"] == VECTOR
    assert kinds["blocks.1.mlp.fc.weight"] == MATRIX


def test_bad_plan_arguments_are_plain_value_errors():
    with pytest.raises(ValueError, match="granularity"):
        plan_segments(SHARD, "flat", 256, ALL)
    with pytest.raises(ValueError, match="kind"):
        plan_segments([ParamExtent("x", "bias", (3,), 0, 3)], "row", 256, ALL)
