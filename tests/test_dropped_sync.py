"""The rule for a fragment sync whose collective failed (docs/design.md §6.1), in one process.

Real replica jobs reach this path when a peer dies mid-collective (tests/
test_fault_tolerance_multirank.py), but when exactly a kill lands is up to the scheduler; here a
membership whose vote says "drop" makes the rule checkable step by step: theta_g and the outer
momentum untouched, local weights kept, the error-feedback residual put back, and the next round
sends everything since the last committed sync.
"""
from __future__ import annotations

import pytest
import torch

from streaming_muloco.config import parse_section
from streaming_muloco.metrics import MetricsLogger
from streaming_muloco.outer_sync import OuterSync
from streaming_muloco.sim import ModuleShard
from streaming_muloco.sim.inprocess import InProcessBackend, InProcessGroup
from streaming_muloco.sync_observer import SyncObserver


class Vote:
    """Stands in for FaultTolerance: every replica's vote is whatever `ok` says."""

    def __init__(self) -> None:
        self.ok = True
        self.healed = False  # the heal path runs in tests/test_fault_tolerance_multirank.py
        self.begun: list[int] = []

    def begin_sync(self, step: int) -> None:
        self.begun.append(step)

    def commit(self, step: int, fragment_id: int, started: float | None = None) -> bool:
        return self.ok


def _replicas(section: dict) -> tuple[list[OuterSync], list[torch.nn.Linear], Vote]:
    cfg = parse_section({"num_replicas": 2, "sync_every": 2, **section})
    group, vote = InProcessGroup(2), Vote()
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 8)
    syncs, models = [], []
    for k in range(2):
        m = torch.nn.Linear(64, 8)
        m.load_state_dict(base.state_dict())
        named = list(m.named_parameters())
        syncs.append(OuterSync(cfg, k, ModuleShard(named, [[n for n, _ in named]]), InProcessBackend(group, k),
                               SyncObserver(MetricsLogger()), membership=vote))
        models.append(m)
    return syncs, models, vote


def _move(models: list[torch.nn.Linear], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, m in enumerate(models):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1 * (k + 1))


def _sync(syncs: list[OuterSync], step: int) -> None:
    for event in syncs[0].schedule.events(step):
        for s in syncs:
            s.handle(event, step)


def _flat(m: torch.nn.Linear) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("compression", [{}, {"compression": {"method": "linear", "bits": 4, "block_size": 32}}],
                         ids=["fp32", "linear4_ef"])
def test_a_dropped_sync_changes_nothing_and_its_delta_goes_into_the_next_round(compression):
    syncs, models, vote = _replicas(compression)
    twins, twin_models, _ = _replicas(compression)  # the same run in which round 2 never happened
    _move(models, 1)
    _move(twin_models, 1)
    _sync(syncs, 2)
    _sync(twins, 2)  # round 1 committed on both
    theta = [s.fragments[0].theta_g.clone() for s in syncs]
    momentum = [s.fragments[0].outer_opt.momentum_buffer.clone() for s in syncs]
    ef = [[e.residual.clone() if e.residual is not None else None for e in s.exchange.ef[0]] for s in syncs]

    _move(models, 2)
    local = [_flat(m) for m in models]
    vote.ok = False
    _sync(syncs, 4)  # round 2: the collective "failed", every replica drops it
    for k, s in enumerate(syncs):
        assert torch.equal(s.fragments[0].theta_g, theta[k])
        assert torch.equal(s.fragments[0].outer_opt.momentum_buffer, momentum[k])
        assert torch.equal(_flat(models[k]), local[k])  # local progress kept
        for e, saved in zip(s.exchange.ef[0], ef[k]):
            assert (e.residual is None and saved is None) or torch.equal(e.residual, saved)
        assert s.outer_steps == 1 and s.fragments[0].in_flight is None

    # Round 3 commits and carries both rounds' progress: the same as a run whose replicas made
    # the two moves and had no round 2 at all (the twins skip their step-4 sync).
    vote.ok = True
    _move(models, 3)
    _move(twin_models, 2)
    _move(twin_models, 3)
    _sync(syncs, 6)
    _sync(twins, 6)
    for s, t in zip(syncs, twins):
        assert torch.equal(s.fragments[0].theta_g, t.fragments[0].theta_g)


def test_two_phase_residuals_are_recut_along_the_new_chunks_when_the_quorum_shrinks():
    from types import SimpleNamespace

    from streaming_muloco.collectives import PseudoGradExchange

    cfg = parse_section({"num_replicas": 3, "compression": {"method": "linear", "bits": 4, "block_size": 32,
                                                            "collective": "two_phase"}})
    ex = PseudoGradExchange(cfg.compression, SimpleNamespace(size=3, rank=0), num_fragments=1)
    n = 1000
    chunk3 = ex.chunk_numel(n)
    whole = torch.randn(3 * chunk3)
    whole[n:] = 0  # the tail padding
    for j, e in enumerate(ex.ef[0]):
        e.residual = whole[j * chunk3:(j + 1) * chunk3].clone()
    ex.ef_second[0].residual = torch.ones(chunk3)
    ex.resize(2)
    assert ex.ef_second[0].residual is None  # its chunk is no longer this rank's
    recut = ex._recut(ex.ef[0], n)
    chunk2 = ex.chunk_numel(n)
    assert len(recut) == 2 and all(e.residual.numel() == chunk2 for e in recut)
    assert torch.equal(torch.cat([e.residual for e in recut])[:n], whole[:n])
