"""What the outer loop reports, against hand computations (one process; the real multi-rank path
is checked in test_outer_loop_multirank.py and test_compressed_multirank.py)."""
from __future__ import annotations

import math

import pytest
import torch

from streaming_muloco.comm.base import Handle
from streaming_muloco.config import parse_section
from streaming_muloco.metrics import MetricsLogger
from streaming_muloco.outer_sync import OuterSync
from streaming_muloco.sim import ModuleShard
from streaming_muloco.sim.inprocess import InProcessBackend, InProcessGroup
from streaming_muloco.sync_observer import SyncObserver, sq_norm, sums


class Recorder(MetricsLogger):
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int]] = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.rows.append((tag, float(value), step))

    def get(self, tag: str) -> list[tuple[int, float]]:
        return [(s, v) for t, v, s in self.rows if t == tag]


def test_chunked_sums_equal_float64_references_for_pieces_and_differences():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1000, generator=g)
    pieces = [torch.randn(300, generator=g), torch.randn(300, generator=g), torch.randn(500, generator=g)]
    x = torch.cat(pieces)[:1000]  # the last piece runs past y: it is clipped
    xd, yd = x.double(), y.double()
    got = sums(pieces, y, chunk=64)
    assert torch.allclose(got, torch.stack([xd.dot(xd), yd.dot(yd), xd.dot(yd)]), rtol=1e-12)
    assert math.isclose(sums(pieces, y, diff=True, chunk=7)[0].item(), (xd - yd).pow(2).sum().item(), rel_tol=1e-12)
    assert math.isclose(sq_norm(pieces, chunk=10).item(), sum(p.double().pow(2).sum().item() for p in pieces),
                        rel_tol=1e-12)


def _two_replicas(section: dict, seed: int = 0) -> tuple[list[OuterSync], list[Recorder], list[torch.nn.Linear]]:
    if "compression" in section:  # one thread drives both replicas: every launch must precede a wait
        section = {**section, "compression": {"background": False, **section["compression"]}}
    cfg = parse_section({"num_replicas": 2, **section})
    group = InProcessGroup(2)
    models, syncs, recs = [], [], []
    torch.manual_seed(seed)
    base = torch.nn.Linear(16, 8)
    for k in range(2):
        m = torch.nn.Linear(16, 8)
        m.load_state_dict(base.state_dict())
        named = list(m.named_parameters())
        rec = Recorder()
        frags = [[n] for n, _ in named] if cfg.num_fragments == 2 else [[n for n, _ in named]]  # weight | bias
        syncs.append(OuterSync(cfg, k, ModuleShard(named, frags), InProcessBackend(group, k), SyncObserver(rec)))
        models.append(m)
        recs.append(rec)
    return syncs, recs, models


def _train_and_sync(syncs: list[OuterSync], models: list[torch.nn.Linear], step: int) -> list[torch.Tensor]:
    """Move each replica's weights, then run the step's events in lockstep; returns each Δ_k (P = 1)."""
    deltas = []
    with torch.no_grad():
        for k, m in enumerate(models):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * (k + 1) * 0.1)
            if len(syncs[k].fragments) == 1:
                deltas.append(syncs[k].fragments[0].theta_g - torch.cat([p.reshape(-1) for p in m.parameters()]))
    for event in syncs[0].schedule.events(step):
        for s in syncs:
            s.handle(event, step)
    return deltas


def test_compressed_sync_reports_norm_cosine_and_compression_error_of_what_was_sent():
    syncs, recs, models = _two_replicas({"sync_every": 1, "compression": {"method": "linear", "bits": 2,
                                                                          "block_size": 32}})
    deltas = _train_and_sync(syncs, models, 1)
    sent = [s.exchange.ef[0][0] for s in syncs]  # residual e = Δ − sent after the first round
    own = [d - e.residual for d, e in zip(deltas, sent)]
    mean = (own[0] + own[1]) / 2
    for s in syncs:
        s.observer.flush()
    for k, rec in enumerate(recs):
        [(step, norm)] = rec.get("outer/pseudo_grad_norm/fragment0")
        assert step == 1 and math.isclose(norm, mean.norm().item(), rel_tol=1e-5)
        [(_, cos)] = rec.get("outer/replica_cosine_to_mean/fragment0")
        assert math.isclose(cos, torch.nn.functional.cosine_similarity(own[k], mean, dim=0).item(), rel_tol=1e-5)
        [(_, err)] = rec.get("compress/relative_error")
        assert math.isclose(err, ((own[k] - deltas[k]).norm() / deltas[k].norm()).item(), rel_tol=1e-5)
        [(_, resid)] = rec.get("compress/ef_residual_norm")
        assert math.isclose(resid, sent[k].residual.norm().item(), rel_tol=1e-5) and resid > 0
        assert rec.get("outer/steps") == [(1, 1.0)]
    assert recs[0].get("outer/replica_cosine_to_mean/fragment0") != recs[1].get("outer/replica_cosine_to_mean/fragment0")


def test_uncompressed_sync_reports_the_norm_but_no_cosine_and_keeps_no_copy():
    syncs, recs, models = _two_replicas({"sync_every": 1})
    deltas = _train_and_sync(syncs, models, 1)
    mean = (deltas[0] + deltas[1]) / 2
    for s in syncs:
        s.observer.flush()
        assert s.fragments[0].own is None and s.fragments[0].in_flight is None
    [(_, norm)] = recs[0].get("outer/pseudo_grad_norm/fragment0")
    assert math.isclose(norm, mean.norm().item(), rel_tol=1e-5)
    assert recs[0].get("outer/replica_cosine_to_mean/fragment0") == []


def test_timings_add_up_and_in_flight_compute_is_measured_from_the_launch():
    syncs, recs, models = _two_replicas({"sync_every": 4, "num_fragments": 2, "sync_delay": 1})
    for step in range(1, 9):  # starts at 2, 4, 6, 8; finishes one step later
        _train_and_sync(syncs, models, step)
    summary = syncs[0].observer.summary()
    exposed = sum(v for _, v in recs[0].get("comm/exposed_seconds"))
    hidden = sum(v for _, v in recs[0].get("comm/in_flight_compute_seconds"))
    assert math.isclose(summary["comm_exposed_s"], exposed) and math.isclose(summary["comm_hidden_s"], hidden)
    assert summary["comm_launch_s"] > 0 and hidden > 0  # a step of training ran between launch and wait
    assert [s for s, _ in recs[0].get("outer/steps")] == [3, 5, 7]


class _Later(Handle):
    """A replica sum that is not in yet: `test()` is False until released."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__(lambda: value, lambda: self.released)
        self.released = False


def test_metrics_wait_for_the_replica_sum_without_blocking_the_sync():
    """With D > 1 a sync's sums arrive later; `finished` logs only what has arrived, in order."""
    handles: list[_Later] = []

    def replica_sum(t: torch.Tensor) -> _Later:
        handles.append(_Later(t * 2))  # "the other shard" holds the same amounts
        return handles[-1]

    rec = Recorder()
    obs = SyncObserver(rec, replica_sum)
    mean = torch.full((4,), 0.5)
    for step in (1, 2):
        obs.encoded(0, mean, None, [], 16)
        obs.launched(0, 0.0)
        obs.finished(0, step, mean, None, wait_started=0.0, waited_s=0.0, sync_s=0.0, outer_steps=step,
                     bytes_sent=0)
    assert rec.get("outer/pseudo_grad_norm/fragment0") == []  # nothing arrived, nothing blocked
    handles[0].released = True
    obs.flush(wait=False)
    assert rec.get("outer/pseudo_grad_norm/fragment0") == [(1, pytest.approx(math.sqrt(2.0)))]
    obs.summary()  # the end of the run waits for the rest
    assert [s for s, _ in rec.get("outer/pseudo_grad_norm/fragment0")] == [1, 2]
