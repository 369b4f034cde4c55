"""The engine's side of a fault-tolerant run (docs/design.md §6.1): what must match across
replica jobs, what a joining replica receives, and meeting the others before the first step.

`fault_tolerance.py` speaks to torchft; this module knows the engine (DeepSpeed's counters and
LR scheduler, the outer loop). The engine's methods of the same names delegate here.
"""
from __future__ import annotations

from typing import Any

from .errors import PeerFailureError
from .fault_tolerance import STARTUP


def replica_fingerprint(engine: Any) -> dict[str, Any]:
    """What every replica of a fault-tolerant run must share: the model's parameter shapes, the
    schedule, the compression, the ZeRO layout and the LR schedule's length."""
    fp = {k: v for k, v in engine.fingerprint().items() if k != "world_size"}
    fp.update({"sync_every": engine.cfg.sync_every, "sync_delay": engine.cfg.sync_delay,
               "params": [[n, list(p.shape)] for n, p in engine.engine.module.named_parameters()]})
    return fp


def heal_state(engine: Any) -> dict[str, Any]:
    """What a joining replica's rank with this shard index receives from this rank."""
    ds = engine.engine
    sched = ds.lr_scheduler
    return {"fingerprint": replica_fingerprint(engine), "inner_steps": engine.inner_steps,
            "global_steps": ds.global_steps, "global_samples": ds.global_samples,
            "lr_scheduler": sched.state_dict() if sched is not None else None, **engine.outer.heal_state()}


def load_heal_state(engine: Any, state: dict[str, Any]) -> None:
    """A peer's outer state and schedule position. The inner optimizer's state stays this
    replica's own (fresh for a restarted job): docs/design.md §6.1 says why."""
    ds = engine.engine
    engine.outer.load_heal_state(state)
    engine.inner_steps = state["inner_steps"]
    ds.global_steps = state["global_steps"]
    ds.global_samples = state["global_samples"]
    if state["lr_scheduler"] is not None and ds.lr_scheduler is not None:
        ds.lr_scheduler.load_state_dict(state["lr_scheduler"])


def join_replicas(engine: Any, step: int) -> int:
    """Meet the other replicas before training; returns the inner step to continue after.

    Collective over the quorum. A replica behind the running ones (a late or restarted job) is
    healed inside the quorum, which the running ones reach at their next sync start: it then
    takes part in that sync (sending zeros that are not counted) and continues from their step.
    Replicas that start together only agree on step and config, and commit a start-up step.
    """
    ft = engine.membership
    if ft is None:
        return step
    engine.phase = f"joining the other replicas (coordinator {ft.lighthouse})"
    ft.begin_sync(step, phase=STARTUP)
    if not ft.healed:
        if not ft.commit(step, -1):
            raise PeerFailureError(f"replica {engine.topo.replica_id}: the replicas could not agree at start-up "
                                   f"({ft.manager.errored()}); start this job again", every_rank=True)
        return step
    t = engine.inner_steps
    engine.phase = f"outer sync after inner step {t} (joining)"
    engine.outer.rejoin(t)
    return t
