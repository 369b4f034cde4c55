"""The pseudo-gradient exchange, with K replicas in one process (InProcessBackend).

The in-process backend is a fake network, so every feature here also runs over real gloo and
MPI in test_compressed_multirank.py; this file pins the arithmetic against hand references.
"""
import pytest
import torch

from streaming_muloco.collectives import PseudoGradExchange
from streaming_muloco.compressors import make_compressor
from streaming_muloco.config import CompressionConfig
from streaming_muloco.error_feedback import ErrorFeedback
from streaming_muloco.sim.inprocess import InProcessBackend, InProcessGroup


def exchange_all(cfg: CompressionConfig, deltas: list[torch.Tensor], rounds: int = 1) -> list[list[torch.Tensor]]:
    """Run `rounds` exchanges of the same K deltas; returns each replica's mean per round."""
    K = len(deltas)
    group = InProcessGroup(K)
    xs = [PseudoGradExchange(cfg, InProcessBackend(group, k), num_fragments=1) for k in range(K)]
    out = [[] for _ in range(K)]
    for _ in range(rounds):
        # send() may reduce the buffer in place (uncompressed): each round gets its own copy.
        handles = [x.send(0, x.encode(0, d.clone())) for x, d in zip(xs, deltas)]
        for k in range(K):
            handles[k].poke()
        for k in range(K):
            out[k].append(handles[k].wait())
    return out, xs


def deltas(K: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * (k + 1) for k in range(K)]


def test_uncompressed_mean_is_the_exact_average():
    ds = deltas(3, 1000)
    means, _ = exchange_all(CompressionConfig(method="none"), ds)
    assert torch.allclose(means[0][0], torch.stack(ds).mean(0), atol=1e-6)


@pytest.mark.parametrize("method, bits", [("linear", 2), ("linear", 4), ("statistical", 2), ("e3m0", 4), ("topk", 8)])
def test_single_phase_equals_hand_reference_and_all_replicas_agree(method, bits):
    K, n = 4, 3000
    cfg = CompressionConfig(method=method, bits=bits, block_size=128, topk_fraction=0.1)
    ds = deltas(K, n)
    means, _ = exchange_all(cfg, ds)
    comp = make_compressor(method, bits, 128, 0.1)
    ref = torch.stack([comp.decompress(comp.compress(d)) for d in ds]).mean(0)  # EF starts empty
    for k in range(K):
        assert torch.equal(means[k][0], means[0][0])
    assert torch.allclose(means[0][0], ref, atol=1e-6)


@pytest.mark.parametrize("method, bits", [("linear", 4), ("statistical", 2)])
def test_two_phase_equals_its_single_process_reference(method, bits):
    K, n, block = 4, 1000, 64
    cfg = CompressionConfig(method=method, bits=bits, block_size=block, collective="two_phase")
    ds = deltas(K, n)
    means, xs = exchange_all(cfg, ds)
    comp = make_compressor(method, bits, block)
    chunk = xs[0].chunk_numel(n)
    padded = [torch.cat([d, torch.zeros(chunk * K - n)]) for d in ds]
    # Phase 1: replica j averages the decoded chunk j of every replica; phase 2: re-compress, gather.
    parts = []
    for j in range(K):
        mean_j = torch.stack([comp.decompress(comp.compress(p[j * chunk:(j + 1) * chunk])) for p in padded]).mean(0)
        parts.append(comp.decompress(comp.compress(mean_j)))
    ref = torch.cat(parts)[:n]
    for k in range(K):
        assert torch.equal(means[k][0], means[0][0])
    assert torch.allclose(means[0][0], ref, atol=1e-6)


@pytest.mark.parametrize("method, bits", [("none", 8), ("linear", 2), ("statistical", 4), ("e3m0", 4), ("topk", 8)])
def test_two_phase_chunks_are_cut_at_the_compressors_alignment(method, bits):
    K, block = 3, 48
    x = PseudoGradExchange(CompressionConfig(method=method, bits=bits, block_size=block, collective="two_phase"),
                           InProcessBackend(InProcessGroup(K), 0), num_fragments=1)
    align = block if method in ("linear", "statistical", "e3m0") else 1
    for n in (1, 47, 1000, 4099):
        chunk = x.chunk_numel(n)
        assert chunk % align == 0 and chunk * K >= n and chunk < max(align, -(-n // K) + align)


def test_two_phase_sends_about_2_k_minus_1_over_k_of_one_payload():
    K, n = 4, 64 * 1024
    _, xs1 = exchange_all(CompressionConfig(method="linear", bits=2), deltas(K, n))
    _, xs2 = exchange_all(CompressionConfig(method="linear", bits=2, collective="two_phase"), deltas(K, n))
    payload = make_compressor("linear", 2, 256).payload_nbytes(n)
    assert xs1[0].comm.bytes_sent == (K - 1) * payload
    assert abs(xs2[0].comm.bytes_sent - 2 * (K - 1) / K * payload) / payload < 0.02


def test_error_feedback_makes_the_running_mean_track_the_true_one():
    """Over many rounds of the same deltas, 2-bit with EF averages to the truth; without EF
    the same rounding error repeats every round."""
    K, n, rounds = 2, 4096, 40
    ds = deltas(K, n, seed=3)
    truth = torch.stack(ds).mean(0)
    with_ef, _ = exchange_all(CompressionConfig(method="linear", bits=2, error_feedback=True), ds, rounds)
    no_ef, _ = exchange_all(CompressionConfig(method="linear", bits=2, error_feedback=False), ds, rounds)
    err_ef = (torch.stack(with_ef[0]).mean(0) - truth).norm() / truth.norm()
    err_no = (torch.stack(no_ef[0]).mean(0) - truth).norm() / truth.norm()
    assert err_ef < 0.05 and err_no > 0.1 and err_ef < err_no / 4


def test_exchange_state_round_trips_error_feedback_buffers():
    cfg = CompressionConfig(method="linear", bits=2, collective="two_phase")
    _, xs = exchange_all(cfg, deltas(2, 1000))
    fresh = PseudoGradExchange(cfg, InProcessBackend(InProcessGroup(2), 0), num_fragments=1)
    fresh.load_state_dict(xs[0].state_dict())
    for a, b in zip(xs[0].ef[0] + [xs[0].ef_second[0]], fresh.ef[0] + [fresh.ef_second[0]]):
        assert torch.equal(a.residual, b.residual)


def test_ef_scale_by_outer_lr_feeds_scaled_deltas():
    cfg = CompressionConfig(method="linear", bits=8, ef_scale_by_outer_lr=True)
    x = PseudoGradExchange(cfg, InProcessBackend(InProcessGroup(1), 0), num_fragments=1, outer_lr=0.5)
    assert isinstance(x.ef[0][0], ErrorFeedback) and x.ef[0][0].scale == 0.5


@pytest.mark.parametrize("cfg", [CompressionConfig(method="linear", bits=2),
                                 CompressionConfig(method="statistical", bits=2, collective="two_phase")])
def test_own_contribution_is_what_the_receivers_decode_and_encode_leaves_delta_alone(cfg):
    """The exchange sums `Encoded.own` in place of decoding this rank's payload again: it must be
    bit-identical to decoding the payload that went on the wire."""
    K, n = 3, 5000
    group = InProcessGroup(K)
    xs = [PseudoGradExchange(cfg, InProcessBackend(group, k), num_fragments=1) for k in range(K)]
    ds = deltas(K, n, seed=5)
    encs = [x.encode(0, d) for x, d in zip(xs, ds)]
    assert all(torch.equal(d, e) for d, e in zip(ds, deltas(K, n, seed=5)))  # delta untouched
    comp = xs[0].compressor
    for enc in encs:
        wires = enc.wire if isinstance(enc.wire, list) else [enc.wire]
        for buf, own in zip(wires, enc.own):
            assert torch.equal(comp.decompress(comp.unflatten(buf, own.numel())), own)


def test_uncompressed_send_reduces_the_pseudo_gradient_buffer_in_place():
    """No copy of the fragment is made for the fp32 all-reduce: the buffer becomes the sum."""
    group = InProcessGroup(2)
    xs = [PseudoGradExchange(CompressionConfig(method="none"), InProcessBackend(group, k), 1) for k in range(2)]
    bufs = [torch.full((8,), 1.0), torch.full((8,), 3.0)]
    handles = [x.send(0, x.encode(0, b)) for x, b in zip(xs, bufs)]
    means = [h.wait() for h in handles]
    assert all(m is b for m, b in zip(means, bufs)) and torch.equal(means[0], torch.full((8,), 2.0))
