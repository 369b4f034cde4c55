"""The outer loop glued onto a DeepSpeed ZeRO engine: launch, wait, outer step, mix.

Per fragment p and per rank (shard-wise, 1/D of the fragment each):
    theta_g[p]   global params of the fragment, as of its last outer step
    outer_opt[p] Nesterov-SGD momentum
    ef[p]        error-feedback residual (when compressing)

At the step where fragment p starts (DESIGN §1):
    1. local = the fp32 master slice;  pseudo_grad = theta_g - local
    2. compress (with error feedback) and launch the async collective over the outer group
At the step where it finishes (sync_delay steps later; the same step when sync_delay = 0):
    3. wait; mean pseudo_grad across replicas
    4. theta_g <- OuterOpt(theta_g, mean)
    5. local <- mix_alpha * local(now) + (1 - mix_alpha) * theta_g, written into ZeRO's masters
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .collectives import PseudoGradExchange
from .comm.base import Handle
from .config import StreamingMuLoCoConfig
from .errors import NonFiniteError
from .metrics import MetricsLogger
from .outer_optimizer import OuterNesterovSGD, mix, pseudo_grad
from .schedule import FragmentSchedule
from .topology import Topology
from .zero_shard import ZeroShard

log = logging.getLogger("streaming_muloco")


def _dot_stats(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """[|a|^2, |b|^2, a.b] accumulated in float64, a chunk at a time: float64 copies of a whole
    shard cost several times its fp32 size in transient memory at every sync (benchmarks/
    bench_memory.py, 48.5 MB shard: MuLoCo's peak RSS over DP fell from +306 MB to +100 MB)."""
    a, b = a.reshape(-1), b.reshape(-1)
    out = torch.zeros(3, dtype=torch.float64, device=a.device)
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        out += torch.stack([x.dot(x), y.dot(y), x.dot(y)])
    return out


@dataclass
class FragmentState:
    theta_g: torch.Tensor
    outer_opt: OuterNesterovSGD
    in_flight: Any = None  # the exchange's handle between start and finish
    started_at: float = 0.0
    local_at_start: torch.Tensor | None = field(default=None, repr=False)


class OuterSync:
    """Runs the schedule's outer syncs after each inner optimizer step."""

    def __init__(self, cfg: StreamingMuLoCoConfig, topo: Topology, shard: ZeroShard, comm: Any,
                 metrics: MetricsLogger) -> None:
        self.cfg = cfg
        self.topo = topo
        self.shard = shard
        self.comm = comm
        self.metrics = metrics
        self.schedule = FragmentSchedule(cfg.sync_every, cfg.num_fragments, cfg.sync_delay)
        self.exchange = PseudoGradExchange(cfg.compression, comm, num_fragments=cfg.num_fragments,
                                           outer_lr=cfg.outer_lr)
        self.fragments = [
            FragmentState(theta_g=shard.gather(p),
                          outer_opt=OuterNesterovSGD(cfg.outer_lr, cfg.outer_momentum, cfg.outer_nesterov))
            for p in range(cfg.num_fragments)
        ]
        self.outer_steps = 0
        self.comm_exposed_s = 0.0  # time blocked in wait(): what overlap failed to hide
        self.comm_launch_s = 0.0
        self.comm_hidden_s = 0.0  # wall time between launch and wait, during which compute ran

    def after_inner_step(self, step: int) -> None:
        """Call once per optimizer step with the count of completed inner steps."""
        touched = self.finish_due(step)
        self.start_due(step)
        touched = self.finish_started(step) or touched
        if touched:
            self.shard.refresh_module_params()

    def poke(self) -> None:
        """Let in-flight collectives progress (MPI moves bytes only inside MPI calls)."""
        for frag in self.fragments:
            if frag.in_flight is not None:
                frag.in_flight.poke()

    # The three phases are public so a single-process simulator can run each phase for all K
    # replicas before the next (a real collective needs every replica to have launched).
    def finish_due(self, step: int) -> bool:
        """Finish fragments launched sync_delay steps ago (before any start: one in flight)."""
        due = self.schedule.finishes_at(step) if self.cfg.sync_delay > 0 else []
        for p in due:
            self._finish(p, step)
        return bool(due)

    def start_due(self, step: int) -> None:
        for p in self.schedule.starts_at(step):
            self._start(p, step)

    def finish_started(self, step: int) -> bool:
        """With sync_delay = 0 a fragment finishes at the step it starts."""
        due = self.schedule.starts_at(step) if self.cfg.sync_delay == 0 else []
        for p in due:
            self._finish(p, step)
        return bool(due)

    def _start(self, p: int, step: int) -> None:
        frag = self.fragments[p]
        t0 = time.perf_counter()
        local = self.shard.gather(p)
        delta = pseudo_grad(frag.theta_g, local)
        if not bool(torch.isfinite(delta).all()):
            if self.cfg.nonfinite_policy == "error":
                raise NonFiniteError(f"replica {self.topo.replica_id} fragment {p}: the pseudo-gradient at step "
                                     f"{step} holds NaN/inf (streaming_muloco.nonfinite_policy='error')")
            log.warning("replica %d fragment %d step %d: NaN/inf pseudo-gradient; sending zeros this round",
                        self.topo.replica_id, p, step)
            delta = torch.zeros_like(delta)
            self.metrics.scalar("outer/nonfinite_skipped", 1.0, step)
        frag.in_flight = self.exchange.launch(p, delta)
        frag.local_at_start = delta  # kept for the directional-quality metric
        frag.started_at = time.perf_counter()
        self.comm_launch_s += frag.started_at - t0

    def _finish(self, p: int, step: int) -> None:
        frag = self.fragments[p]
        t0 = time.perf_counter()
        hidden = t0 - frag.started_at
        self.comm_hidden_s += hidden
        mean = frag.in_flight.wait()
        t1 = time.perf_counter()
        self.comm_exposed_s += t1 - t0
        own = frag.local_at_start
        frag.in_flight, frag.local_at_start = None, None
        frag.outer_opt.step(frag.theta_g, mean)
        new_local = frag.theta_g if self.cfg.mix_alpha == 0.0 else mix(self.shard.gather(p), frag.theta_g,
                                                                       self.cfg.mix_alpha)
        self.shard.scatter(p, new_local)
        self.outer_steps += 1
        self._log_round(p, step, mean, own, exposed=t1 - t0, total=time.perf_counter() - t0)
        self.metrics.scalar("comm/in_flight_compute_seconds", hidden, step)

    def _log_round(self, p: int, step: int, mean: torch.Tensor, own: torch.Tensor, exposed: float,
                   total: float) -> None:
        """Pseudo-gradient norm and the replica's cosine to the mean (MuLoCo's quality measure).

        Shards are summed over the replica (D ranks) so the numbers describe the whole fragment.
        """
        stats = _dot_stats(mean, own)
        if self.topo.ranks_per_replica > 1:
            dist.all_reduce(stats, group=self.topo.replica_group)
        mean_sq, own_sq, dot = stats.tolist()
        cos = dot / math.sqrt(mean_sq * own_sq) if mean_sq > 0 and own_sq > 0 else 0.0
        m = self.metrics
        m.scalar("outer/steps", self.outer_steps, step)
        m.scalar(f"outer/pseudo_grad_norm/fragment{p}", math.sqrt(mean_sq), step)
        m.scalar(f"outer/replica_cosine_to_mean/fragment{p}", cos, step)
        m.scalar("outer/sync_seconds", total, step)
        m.scalar("comm/exposed_seconds", exposed, step)
        m.scalar("comm/bytes_sent_total", self.comm.bytes_sent, step)
        for tag, value in self.exchange.last_stats(p).items():
            m.scalar(tag, value, step)

    def state_nbytes(self) -> dict[str, int]:
        """Bytes this rank holds for the outer loop (theta_g, outer momentum, EF residuals) next
        to its fp32 shard: the outer state must scale with the ZeRO shard, never the model."""
        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        shard = sum(nbytes(f.theta_g) for f in self.fragments)
        momentum = sum(nbytes(f.outer_opt.momentum_buffer) for f in self.fragments)
        efs = [e for per_frag in self.exchange.ef for e in per_frag] + list(self.exchange.ef_second)
        ef = sum(nbytes(e.residual) for e in efs)
        return {"shard_fp32": shard, "theta_g": shard, "outer_momentum": momentum, "error_feedback": ef,
                "total": shard + momentum + ef}

    # ---- checkpoint state -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit, fragments in flight included.

        A collective cannot be saved half-done, so a fragment in flight is waited for here and
        its averaged pseudo-gradient is stored; on resume it finishes at its scheduled step
        from the stored value, exactly as the uninterrupted run would have.
        """
        in_flight = {p: {"mean": f.in_flight.wait().clone(), "own": f.local_at_start.clone()}
                     for p, f in enumerate(self.fragments) if f.in_flight is not None}
        return {
            "in_flight": in_flight,
            "outer_steps": self.outer_steps,
            "theta_g": [f.theta_g.clone() for f in self.fragments],
            "outer_opt": [f.outer_opt.state_dict() for f in self.fragments],
            "exchange": self.exchange.state_dict(),
            "bytes_sent": self.comm.bytes_sent,
        }

    def load_state_dict(self, state: dict) -> None:
        self.outer_steps = state["outer_steps"]
        for f, theta, opt in zip(self.fragments, state["theta_g"], state["outer_opt"]):
            f.theta_g.copy_(theta)
            f.outer_opt.load_state_dict(opt)
        self.exchange.load_state_dict(state["exchange"])
        self.comm.bytes_sent = state["bytes_sent"]
        for p, pending in state["in_flight"].items():
            frag = self.fragments[p]
            mean = pending["mean"].to(frag.theta_g.device)
            frag.in_flight = Handle(lambda m=mean: m)
            frag.local_at_start = pending["own"].to(frag.theta_g.device)
            frag.started_at = time.perf_counter()
