"""The outer loop glued onto a ZeRO shard: the schedule's events, each a few lines of data path.

Per fragment p and per rank (shard-wise, 1/D of the fragment each; docs/design.md §1, §4):
    theta_g[p]   global params of the fragment, as of its last outer step
    outer_opt[p] Nesterov-SGD momentum
    ef[p]        error-feedback residual, inside the exchange (when compressing)

start p:  gather -> pseudo-gradient -> (non-finite policy) -> compress with EF -> launch
finish p: wait -> outer step -> mix -> write back      (sync_delay steps later; with 0, at once)

With eager updates (docs/design.md §3) the outer step moves to the start, on the eager outer
gradient, and the finish only folds the arrived average into `others[p]`:
start p:  gather -> pseudo-gradient -> outer step on others[p] + Δ/K -> write back -> launch
finish p: wait -> others[p] += mean                    (up to a whole period H later)

What the path computes goes to a `SyncObserver` (timings, norms, cosine, compression error);
the path never waits on it. The order of events comes from `FragmentSchedule.events`.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .collectives import Encoded, PseudoGradExchange
from .comm.base import CommBackend, Handle
from .compression import has_nonfinite
from .config import StreamingMuLoCoConfig
from .errors import NonFiniteError
from .outer_optimizer import (OuterNesterovSGD, eager_arrived, eager_outer_grad, eager_pending, mix,
                              pseudo_grad)
from .outer_state import OuterStateStore
from .schedule import FragmentSchedule, SyncEvent
from .segments import ParamExtent
from .sync_observer import SyncObserver

log = logging.getLogger("streaming_muloco")


class Shard(Protocol):
    """Where a replica's fragment slices live: ZeRO's fp32 masters, or a plain module (simulator)."""

    def gather(self, fragment_id: int) -> torch.Tensor: ...

    def scatter(self, fragment_id: int, flat: torch.Tensor) -> None: ...

    def refresh_module_params(self) -> None: ...

    def extents(self, fragment_id: int) -> list[ParamExtent]: ...


@dataclass
class FragmentState:
    theta_g: torch.Tensor
    outer_opt: OuterNesterovSGD
    in_flight: Handle | None = None  # the exchange's handle between start and finish
    own: list[torch.Tensor] | None = None  # this replica's decoded contribution, for the observer
    ef_snapshot: list[torch.Tensor | None] | None = None  # fault tolerance: EF before this round
    started: float = 0.0  # perf_counter at start (fault tolerance: time lost to a dropped sync)
    encoding: Future | None = None  # background compression: (Encoded, seconds), not launched yet
    delta: torch.Tensor | None = None  # its pseudo-gradient, for the observer at the launch
    start_s: float = 0.0  # seconds the start itself took on the training path
    others: torch.Tensor | None = None  # eager updates: last average minus this replica's eager term


class OuterSync:
    """Runs the schedule's outer syncs after each inner optimizer step.

    Args:
        cfg: the parsed `streaming_muloco` section.
        replica_id: this replica's index (for messages).
        shard: this rank's fragment slices.
        comm: the collectives backend over the outer group (K ranks, one per replica).
        observer: receives what each sync computed (metrics and timings).
        membership: fault tolerance (a `FaultTolerance`): a quorum before each start, a commit
            vote before each outer step; None in a single job, where every sync commits.
    """

    def __init__(self, cfg: StreamingMuLoCoConfig, replica_id: int, shard: Shard, comm: CommBackend,
                 observer: SyncObserver, membership: Any = None) -> None:
        self.cfg = cfg
        self.membership = membership
        self.after_finish: list[Any] = []  # callbacks (fragment_id, step, theta_g) after each outer step
        # (at a finish; with eager updates, at the start that takes it)
        self.replica_id = replica_id
        self.shard = shard
        self.comm = comm
        self.observer = observer
        self.schedule = FragmentSchedule(cfg.sync_every, cfg.num_fragments, cfg.sync_delay, cfg.eager_updates)
        self.eager = cfg.eager_updates
        # theta_g, outer momentum and EF residuals rest here between syncs (outer_state.py)
        self.store = OuterStateStore(cfg.outer_state_device, getattr(shard, "device", torch.device("cpu")))
        comp = cfg.compression
        extents = None  # parameter-aware compression needs each fragment shard's layout
        if comp.method != "none" and comp.granularity != "flat":
            extents = [shard.extents(p) for p in range(cfg.num_fragments)]
        self.exchange = PseudoGradExchange(comp, comm, num_fragments=cfg.num_fragments,
                                           outer_lr=cfg.outer_lr, store=self.store, extents=extents,
                                           background=self._compresses_in_background(cfg, membership))
        # Compression off the training path (docs/design.md §5): one worker thread encodes in
        # start order; the main thread launches each payload in that same order, so every
        # replica issues its collectives in one order without asking the others.
        self._encoder = (ThreadPoolExecutor(1, thread_name_prefix="streaming_muloco-encode")
                         if self.exchange.background else None)
        self._queue: deque[int] = deque()
        self.fragments = [
            FragmentState(theta_g=self.store.rest(shard.gather(p)),
                          outer_opt=OuterNesterovSGD(cfg.outer_lr, cfg.outer_momentum, cfg.outer_nesterov))
            for p in range(cfg.num_fragments)
        ]
        if self.eager:  # the first round has no earlier average: its others' part is zero
            for f in self.fragments:
                f.others = self.store.rest(torch.zeros_like(f.theta_g))
        self.outer_steps = 0

    @staticmethod
    def _compresses_in_background(cfg: StreamingMuLoCoConfig, membership: Any) -> bool:
        """Single-phase compressed exchanges only: two-phase launches its second collective from
        `poke`, whose timing differs per rank, and a fault-tolerant start votes on the quorum
        and may heal in between; both keep compression inline."""
        comp = cfg.compression
        return (comp.background and comp.method != "none" and comp.collective == "single_phase"
                and membership is None)

    def after_inner_step(self, step: int) -> None:
        """Call once per optimizer step with the count of completed inner steps. In a fault-
        tolerant run a replica that was behind is healed at a start's quorum and continues at its
        peers' step (its engine's `inner_steps` moves there)."""
        self._run(self.schedule.events(step), step)

    def _run(self, events: list[SyncEvent], step: int, quorum_done: bool = False) -> None:
        for event in events:
            if event.kind == "finish":
                self.finish(event.fragment_id, step)
                continue
            healed_at = self.start(event.fragment_id, step, quorum_done)
            if healed_at is not None:
                self.rejoin(healed_at)
                return
            quorum_done = False
        # the module's params change where an outer step is written back: at a finish, or at an
        # eager start
        if any(e.kind == ("start" if self.eager else "finish") for e in events):
            t_refresh = time.perf_counter()
            self.shard.refresh_module_params()
            self.observer.refreshed(time.perf_counter() - t_refresh)

    def rejoin(self, step: int) -> None:
        """After a heal at the quorum of a sync start: this replica now holds a peer's theta_g,
        momentum and schedule position `step`. It takes part in the rest of that step's events as
        the peers do (the quorum is done; it sends zeros that are not counted)."""
        assert all(f.in_flight is None for f in self.fragments), "tau < H/P: nothing is in flight at a start"
        events = self.schedule.events(step)
        first = next(i for i, e in enumerate(events) if e.kind == "start")
        self._run(events[first:], step, quorum_done=True)
        self.shard.refresh_module_params()

    def handle(self, event: SyncEvent, step: int) -> None:
        """One event; public so the simulator can run each event for all K replicas in lockstep."""
        (self.start if event.kind == "start" else self.finish)(event.fragment_id, step)

    def poke(self) -> None:
        """Launch payloads compressed in the background (in start order), and let in-flight
        collectives progress (MPI moves bytes only inside MPI calls)."""
        self._launch_encoded()
        for frag in self.fragments:
            if frag.in_flight is not None:
                frag.in_flight.poke()

    def start(self, p: int, step: int, quorum_done: bool = False) -> int | None:
        """Launch fragment p's round; returns the peers' step instead if this replica was healed
        at the quorum (its round here is void: `rejoin` runs theirs)."""
        frag, t0 = self.fragments[p], time.perf_counter()
        frag.started = t0
        if self.membership is not None:
            if not quorum_done:
                self.membership.begin_sync(step)
                if self.membership.healed:
                    return self.membership.healed_step
            self.exchange.resize(self.comm.size)
            frag.ef_snapshot = self.exchange.snapshot_ef(p)
        local = self.shard.gather(p)
        delta = pseudo_grad(self.store.fetch(frag.theta_g), local, out=local)  # the gathered copy becomes Δ
        if has_nonfinite(delta):
            delta = self._nonfinite(p, step, delta)
        if self.eager:  # before the launch: an fp32 all-reduce overwrites Δ in place
            self._eager_step(p, step, delta)
        if self._encoder is not None:
            frag.encoding, frag.delta = self._encoder.submit(self._timed_encode, p, delta), delta
            frag.start_s = time.perf_counter() - t0
            self._queue.append(p)
            return None
        enc, compress_s = self._timed_encode(p, delta)
        frag.start_s = time.perf_counter() - t0 - compress_s
        self._send(p, enc, delta, compress_s, exposed_s=compress_s)
        return None

    def _timed_encode(self, p: int, delta: torch.Tensor) -> tuple[Encoded, float]:
        t = time.perf_counter()
        enc = self.exchange.encode(p, delta)
        return enc, time.perf_counter() - t

    def _send(self, p: int, enc: Encoded, delta: torch.Tensor, compress_s: float, exposed_s: float) -> None:
        frag, t0 = self.fragments[p], time.perf_counter()
        self.observer.encoded(p, delta, enc.own, enc.residuals, enc.payload_bytes, compress_s=compress_s,
                              exposed_compress_s=exposed_s)
        frag.in_flight, frag.own = self.exchange.send(p, enc), enc.own
        self.observer.launched(p, frag.start_s + exposed_s + time.perf_counter() - t0)

    def _launch_encoded(self, until: int | None = None, wait_all: bool = False) -> None:
        """Launch background-compressed payloads in start order: those already done, plus every
        one up to fragment `until` (waiting for it), or all of them with `wait_all`."""
        while self._queue:
            p = self._queue[0]
            frag = self.fragments[p]
            assert frag.encoding is not None
            if not (wait_all or until is not None or frag.encoding.done()):
                return
            t = time.perf_counter()
            enc, compress_s = frag.encoding.result()  # re-raises what the worker raised
            exposed = time.perf_counter() - t
            self._queue.popleft()
            delta, frag.encoding, frag.delta = frag.delta, None, None
            self._send(p, enc, delta, compress_s, exposed)
            if p == until:
                return

    def _eager_step(self, p: int, step: int, delta: torch.Tensor) -> None:
        """The outer step of an eager update: on others[p] + (s/K)·Δ, written back at once, so the
        next inner steps start from it; others[p] then holds −(s/K)·Δ until the average arrives."""
        frag, store = self.fragments[p], self.store
        assert frag.others is not None
        share = self.exchange.delta_scale / self.comm.mean_divisor()
        others = store.fetch(frag.others)
        g = eager_outer_grad(others, delta, share)
        eager_pending(others, delta, share)
        store.put_back(frag.others, others)
        theta_g = self._outer_step(frag, g)
        self.shard.scatter(p, theta_g)
        self._stepped(p, step, theta_g)

    def _stepped(self, p: int, step: int, theta_g: torch.Tensor) -> None:
        """Count an outer step written back, and tell the `after_finish` callbacks."""
        self.outer_steps += 1
        for callback in self.after_finish:
            callback(p, step, theta_g)

    def finish(self, p: int, step: int) -> None:
        frag, t0 = self.fragments[p], time.perf_counter()
        if frag.in_flight is None and self.membership is not None:
            return  # its round was dropped by a whole-job resume (state_dict)
        if frag.encoding is not None:
            self._launch_encoded(until=p)  # that wait is compression's, reported as such
            t0 = time.perf_counter()
        mean = frag.in_flight.wait()
        waited = time.perf_counter() - t0
        if self.membership is not None and not self.membership.commit(step, p, started=frag.started):
            self.exchange.restore_ef(p, frag.ef_snapshot)  # theta_g and momentum are untouched
            frag.in_flight, frag.own, frag.ef_snapshot = None, None, None
            return
        frag.ef_snapshot = None
        t_apply = time.perf_counter()
        if self.eager:
            assert frag.others is not None
            others = self.store.fetch(frag.others)
            eager_arrived(others, mean)
            self.store.put_back(frag.others, others)
        else:
            theta_g = self._outer_step(frag, mean)
            alpha = self.cfg.mix_alpha
            self.shard.scatter(p, theta_g if alpha == 0.0 else mix(self.shard.gather(p), theta_g, alpha))
            self._stepped(p, step, theta_g)
        apply_s = time.perf_counter() - t_apply
        self.observer.finished(p, step, mean, frag.own, wait_started=t0, waited_s=waited,
                               sync_s=time.perf_counter() - t0, outer_steps=self.outer_steps,
                               bytes_sent=self.comm.bytes_sent, apply_s=apply_s)
        frag.in_flight, frag.own = None, None

    def _outer_step(self, frag: FragmentState, mean: torch.Tensor) -> torch.Tensor:
        """The outer Nesterov step on working copies of theta_g and the momentum (the resting
        tensors themselves unless the outer state rests in host memory); returns theta_g's."""
        store, opt = self.store, frag.outer_opt
        theta_g = store.fetch(frag.theta_g)
        resting_momentum = opt.momentum_buffer
        if resting_momentum is not None:
            opt.momentum_buffer = store.fetch(resting_momentum)
        opt.step(theta_g, mean)
        if opt.momentum_buffer is not None:  # None with outer_momentum 0
            if resting_momentum is None:  # the first step created it on the device
                resting_momentum = store.rest(opt.momentum_buffer)
            store.put_back(resting_momentum, opt.momentum_buffer)
            opt.momentum_buffer = resting_momentum
        store.put_back(frag.theta_g, theta_g)
        return theta_g

    def _nonfinite(self, p: int, step: int, delta: torch.Tensor) -> torch.Tensor:
        """`nonfinite_policy`: stop, or send zeros so the other replicas' state stays clean."""
        where = f"replica {self.replica_id} fragment {p} step {step}"
        if self.cfg.nonfinite_policy == "error":
            raise NonFiniteError(f"{where}: the pseudo-gradient holds NaN/inf (streaming_muloco.nonfinite_policy="
                                 f"'error'); restart from the last checkpoint with --resume, perhaps with a lower "
                                 f"learning rate")
        log.warning("%s: NaN/inf pseudo-gradient; sending zeros this round", where)
        self.observer.nonfinite_skipped(step)
        return delta.zero_()

    def state_nbytes(self) -> dict[str, int]:
        """Bytes this rank holds for the outer loop (theta_g, outer momentum, EF residuals) next
        to its fp32 shard: the outer state must scale with the ZeRO shard, never the model."""
        def nbytes(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        shard = sum(nbytes(f.theta_g) for f in self.fragments)
        momentum = sum(nbytes(f.outer_opt.momentum_buffer) for f in self.fragments)
        ef = self.exchange.ef_nbytes()
        eager = sum(nbytes(f.others) for f in self.fragments)
        total = shard + momentum + ef + eager
        on_host = self.store.placement == "host"
        return {"shard_fp32": shard, "theta_g": shard, "outer_momentum": momentum, "error_feedback": ef,
                "eager_others": eager, "total": total, "host": total if on_host else 0,
                "device": 0 if on_host else total}

    # ---- fault tolerance: what a joining replica receives -------------------------------------
    def heal_state(self) -> dict[str, Any]:
        """theta_g and the outer momentum of every fragment (this shard), copied: torchft serves
        them to the joiner after this rank has moved on."""
        self.store.synchronize()
        return {"theta_g": [f.theta_g.detach().clone() for f in self.fragments],
                "outer_opt": [f.outer_opt.state_dict() for f in self.fragments],  # a copy already
                "outer_steps": self.outer_steps}

    def load_heal_state(self, state: dict[str, Any]) -> None:
        """Become the peer: its theta_g and momentum, local weights = theta_g for every fragment,
        error feedback zero (the peer's residual is its own debt, not ours)."""
        self.store.synchronize()
        self.outer_steps = state["outer_steps"]
        for p, (f, theta, opt) in enumerate(zip(self.fragments, state["theta_g"], state["outer_opt"])):
            f.theta_g.copy_(theta.to(f.theta_g.device))
            f.outer_opt.load_state_dict({k: (v.to(f.theta_g.device) if isinstance(v, torch.Tensor) else v)
                                         for k, v in opt.items()})
            self._rest_momentum(f)
            self.shard.scatter(p, f.theta_g)
        self.exchange.reset_ef()
        self.shard.refresh_module_params()

    def _rest_momentum(self, f: FragmentState) -> None:
        """A loaded momentum buffer goes where this run keeps its outer state."""
        if self.store.on_host and f.outer_opt.momentum_buffer is not None:
            f.outer_opt.momentum_buffer = self.store.rest(f.outer_opt.momentum_buffer)

    # ---- checkpoint state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit, fragments in flight included.

        A collective cannot be saved half-done, so a fragment in flight is waited for here and
        its averaged pseudo-gradient is stored; on resume it finishes at its scheduled step
        from the stored value, exactly as the uninterrupted run would have (its sync then
        reports no cosine: the contribution it was measured against is not saved).
        """
        self._launch_encoded(wait_all=True)
        self.store.synchronize()
        if self.membership is not None:
            # Fault tolerance: the round in flight has not been voted on yet, so it is not saved;
            # a resume drops it (error feedback as before it, theta_g untouched) and its
            # pseudo-gradient goes into the fragment's next round, on every replica alike.
            in_flight = {p: {"ef_snapshot": f.ef_snapshot} for p, f in enumerate(self.fragments)
                         if f.in_flight is not None}
        else:
            in_flight = {p: {"mean": f.in_flight.wait().clone()}
                         for p, f in enumerate(self.fragments) if f.in_flight is not None}
        return {
            "in_flight": in_flight,
            "outer_steps": self.outer_steps,
            "theta_g": [f.theta_g.clone() for f in self.fragments],
            "outer_opt": [f.outer_opt.state_dict() for f in self.fragments],
            "exchange": self.exchange.state_dict(),
            "bytes_sent": self.comm.bytes_sent,
            **({"eager_others": [f.others.clone() for f in self.fragments]} if self.eager else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer_steps = state["outer_steps"]
        self.store.synchronize()
        for f, theta, opt in zip(self.fragments, state["theta_g"], state["outer_opt"]):
            f.theta_g.copy_(theta)
            f.outer_opt.load_state_dict(opt)
            self._rest_momentum(f)
        self.exchange.load_state_dict(state["exchange"])
        self.comm.bytes_sent = state["bytes_sent"]
        if self.eager:
            for f, others in zip(self.fragments, state["eager_others"]):
                f.others.copy_(others)
        for p, pending in state["in_flight"].items():
            frag = self.fragments[p]
            if "ef_snapshot" in pending:
                self.exchange.restore_ef(p, pending["ef_snapshot"])
                continue
            mean = pending["mean"].to(self.store.device)
            frag.in_flight, frag.own = Handle(lambda m=mean: m), None
