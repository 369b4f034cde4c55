"""Error feedback: nothing is lost, only delayed (single process, CPU, fast)."""
from __future__ import annotations

import pytest
import torch

from streaming_muloco.compressors import make_compressor
from streaming_muloco.error_feedback import ErrorFeedback

LOSSY = [("linear", 2), ("linear", 4), ("statistical", 2), ("e3m0", 4), ("topk", 8)]
LOSSY_IDS = [f"{m}{b}" for m, b in LOSSY]


def deltas(rounds: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 1e-2 for _ in range(rounds)]


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("method,bits", LOSSY, ids=LOSSY_IDS)
def test_sum_sent_plus_residual_equals_scaled_sum_of_inputs(method: str, bits: int, scale: float) -> None:
    comp = make_compressor(method, bits, 64, 0.05)
    ef = ErrorFeedback(beta=1.0, scale=scale)
    sent_sum, in_sum = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for d in deltas(50, 1000):
        payload, sent = ef.step(d, comp)
        assert torch.equal(sent, comp.decompress(payload))  # what the receivers decode
        sent_sum += sent.double()
        in_sum += d.double()
    assert ef.residual is not None
    torch.testing.assert_close(sent_sum + ef.residual.double(), scale * in_sum, rtol=0, atol=1e-6)


def test_beta_decays_the_residual_before_adding_the_delta() -> None:
    comp = make_compressor("linear", 2, 64)
    ef = ErrorFeedback(beta=0.9, scale=0.5)
    d1, d2 = deltas(2, 300)
    _, s1 = ef.step(d1, comp)
    e1 = 0.5 * d1 - s1
    assert ef.residual is not None
    torch.testing.assert_close(ef.residual, e1)
    _, s2 = ef.step(d2, comp)
    torch.testing.assert_close(s2, comp.decompress(comp.compress(0.9 * e1 + 0.5 * d2)))
    torch.testing.assert_close(ef.residual, 0.9 * e1 + 0.5 * d2 - s2)


@pytest.mark.parametrize("method,bits", [("linear", 2), ("statistical", 2)])
def test_two_bit_residual_stays_bounded_over_200_rounds(method: str, bits: int) -> None:
    comp = make_compressor(method, bits, 256)
    ef = ErrorFeedback()
    norms = []
    for d in deltas(200, 4096, seed=1):
        ef.step(d, comp)
        assert ef.residual is not None
        norms.append(float(ef.residual.norm()))
    delta_norm = float(deltas(1, 4096)[0].norm())
    assert max(norms[100:]) < 1.5 * max(norms[:20])  # no linear growth: 10x more rounds, same size
    assert max(norms) < 2 * delta_norm


@pytest.mark.parametrize("method,bits", [("linear", 2), ("statistical", 2), ("e3m0", 4)])
def test_running_sum_with_feedback_tracks_the_true_sum_far_better_than_without(method: str, bits: int) -> None:
    comp = make_compressor(method, bits, 256)
    base = deltas(1, 4096, seed=2)[0]  # a persistent direction, as pseudo-gradients have
    with_ef, without = ErrorFeedback(), ErrorFeedback(enabled=False)
    true_sum, ef_sum, plain_sum = torch.zeros(4096), torch.zeros(4096), torch.zeros(4096)
    for noise in deltas(200, 4096, seed=3):
        d = base + 0.1 * noise
        true_sum += d
        ef_sum += with_ef.step(d, comp)[1]
        plain_sum += without.step(d, comp)[1]
    ef_err, plain_err = float((ef_sum - true_sum).norm()), float((plain_sum - true_sum).norm())
    assert ef_err < 0.05 * plain_err
    assert ef_err < 2 * float(base.norm())  # the error is one round's residual, not 200 rounds'


def test_disabled_feedback_is_plain_compression_of_the_scaled_delta() -> None:
    comp = make_compressor("linear", 2, 64)
    ef = ErrorFeedback(enabled=False, scale=0.5)
    for d in deltas(3, 200):
        payload, sent = ef.step(d, comp)
        assert torch.equal(payload.to_flat_bytes(), comp.compress(0.5 * d).to_flat_bytes())
        assert torch.equal(sent, comp.decompress(payload))
    assert ef.residual is None


def test_uncompressed_feedback_sends_the_scaled_delta_and_keeps_no_error() -> None:
    ef = ErrorFeedback(scale=0.7)
    d = deltas(1, 100)[0]
    _, sent = ef.step(d, make_compressor("none"))
    torch.testing.assert_close(sent, 0.7 * d)
    assert ef.residual is not None and float(ef.residual.abs().max()) == 0.0


def test_residual_is_fp32_on_the_delta_device_for_low_precision_deltas() -> None:
    ef = ErrorFeedback()
    ef.step(torch.randn(100).bfloat16(), make_compressor("linear", 4, 32))
    assert ef.residual is not None
    assert ef.residual.dtype == torch.float32 and ef.residual.device == torch.device("cpu")


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    comp = make_compressor("statistical", 2, 64)
    ds = deltas(10, 500)
    a = ErrorFeedback(beta=0.9)
    for d in ds[:5]:
        a.step(d, comp)
    b = ErrorFeedback(beta=0.9)
    b.load_state_dict(a.state_dict())
    for d in ds[5:]:
        assert torch.equal(a.step(d, comp)[0].to_flat_bytes(), b.step(d, comp)[0].to_flat_bytes())


def test_state_dict_is_a_copy_not_a_view_of_the_live_residual() -> None:
    ef = ErrorFeedback()
    ef.step(deltas(1, 50)[0], make_compressor("linear", 2, 16))
    saved = ef.state_dict()["residual"].clone()
    state = ef.state_dict()
    ef.step(deltas(1, 50, seed=9)[0], make_compressor("linear", 2, 16))
    assert torch.equal(state["residual"], saved)


def test_preallocated_residual_starts_at_zero() -> None:
    ef = ErrorFeedback(numel=10)
    assert ef.residual is not None and torch.equal(ef.residual, torch.zeros(10))


@pytest.mark.parametrize("kwargs,match", [
    ({"beta": 0.0}, r"beta \(0.0\) must be in \(0, 1\]"),
    ({"beta": 1.5}, r"beta \(1.5\) must be in \(0, 1\]"),
    ({"scale": 0.0}, r"scale \(0.0\) must be a finite non-zero number"),
])
def test_constructor_explains_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ErrorFeedback(**kwargs)


def test_step_rejects_a_delta_of_another_size() -> None:
    ef = ErrorFeedback(numel=10)
    with pytest.raises(ValueError, match="one ErrorFeedback per fragment shard"):
        ef.step(torch.zeros(11), make_compressor("linear", 8))


def test_load_state_dict_rejects_another_config() -> None:
    state = ErrorFeedback(beta=0.9).state_dict()
    with pytest.raises(ValueError, match="resume with the same compression config"):
        ErrorFeedback(beta=1.0).load_state_dict(state)
