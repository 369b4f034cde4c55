"""Which peer is dead or hung when a collective fails: a roll call over the rendezvous store.

What the backends say by themselves (torch 2.13, measured with 2 CPU ranks):
- gloo, peer hung: "Timed out waiting 15000ms for recv operation to complete": no rank.
- gloo, peer died: "Read error [127.0.0.1]:9872: Connection reset by peer": the address and
  port of one TCP pair, not a rank (and many ranks share a host).
- TORCH_DISTRIBUTED_DEBUG=DETAIL wraps each gloo group in a checker that runs a monitored
  barrier before every collective: the group's first rank then gets "Ranks 1 failed to pass
  monitoredBarrier in 15000 ms" (group-local ranks), the others a generic error. But every
  async collective then starts with a blocking barrier, which undoes the outer sync's overlap:
  a debugging aid, not a default.
- MPI (Open MPI without ULFM): MPI_Test on a non-blocking collective says done or not done,
  never who is missing. Under mpirun a rank that dies takes the job down and mpirun names its
  rank and pid; a hung one is only seen by our deadline (mpi_backend) and this roll call.

So every rank runs a responder thread on its own connection to the torch.distributed
rendezvous store (the TCPStore that rank 0 hosts): it blocks in a store wait, costing nothing,
until a peer pings it, and answers with its current phase. A rank whose collective failed pings
its peers and waits a few seconds. Any live rank answers within milliseconds, even while it is
blocked in a collective (the wait releases the GIL); a dead rank, a stopped one (SIGSTOP,
swapped-out VM) or one stuck in C code holding the GIL does not. If the store itself does not
answer, its host, rank 0, is the one that is dead or stopped. The roll call works the same
whether the failed collective was gloo, NCCL or MPI: it only needs torch.distributed's store.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.distributed as dist

from ..errors import PeerFailureError

log = logging.getLogger("streaming_muloco")

_KEY = "streaming_muloco/diag/"
ROLL_CALL_S = 5.0  # a live responder answers in milliseconds; this only bounds a dead store
# Asking every rank is O(world) store operations per failing rank: beyond this many ranks only
# the ranks this one exchanges with directly (its replica group and its outer group) are asked.
ASK_ALL_UP_TO = 64


def _tcp_store() -> Any | None:
    """The TCPStore under torch.distributed's default store (PrefixStores peeled off)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


_responder: dict[str, Any] = {}


def start_responder(rank: int, phase: Callable[[], str]) -> bool:
    """Register this rank (host, pid) and answer roll calls from now on; False without a store.

    The thread has its own store connection: the main thread's store calls must never queue
    behind a blocking wait. Before a normal exit every rank calls `stop_responder()` and then
    a barrier (train.run does): rank 0 hosts the store, and a responder whose connection
    closes while its interpreter is shutting down aborts the process.
    """
    store = _tcp_store()
    if store is None or _responder:
        return False
    try:
        store.set(f"{_KEY}where/{rank}", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        client = dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(days=7))
    except Exception as e:  # noqa: BLE001 - a diagnostic aid must never stop training
        log.warning("rank %d: no roll-call responder (%s); a failed collective will not name its peer", rank,
                    first_line(e))
        return False
    stopping = threading.Event()
    thread = threading.Thread(target=_respond, args=(client, rank, phase, stopping), daemon=True,
                              name="streaming_muloco-rollcall")
    _responder.update(thread=thread, store=store, key=f"{_KEY}ping/{rank}", stopping=stopping)
    thread.start()
    atexit.register(stop_responder, 2.0)  # a fallback: exits that skip train.run's orderly end
    return True


def stop_responder(timeout_s: float = 10.0) -> None:
    """Wake this rank's responder with a stop and join it; harmless when none runs."""
    if not _responder or not _responder["thread"].is_alive():
        return
    _responder["stopping"].set()
    try:
        _responder["store"].set(_responder["key"], "stop")
    except Exception:  # noqa: BLE001 - the store is gone: the thread's wait has failed already
        pass
    _responder["thread"].join(timeout_s)


def _respond(client: Any, rank: int, phase: Callable[[], str], stopping: threading.Event) -> None:
    key = f"{_KEY}ping/{rank}"
    while True:
        try:
            client.wait([key])
            break
        except Exception as e:  # noqa: BLE001 - a week without a ping, or the store is gone
            if "timeout" in str(e).lower() and not stopping.is_set():
                continue
            return
    if stopping.is_set():
        return
    try:
        now = phase()
    except Exception as e:  # noqa: BLE001
        now = f"unknown ({type(e).__name__})"
    try:
        client.set(f"{_KEY}pong/{rank}", json.dumps({"phase": now}))
    except Exception:  # noqa: BLE001 - the caller will report this rank as silent
        pass


@dataclass
class RollCall:
    """The answers to one roll call."""

    asked: list[int]
    silent: list[int] = field(default_factory=list)  # did not answer: dead, stopped, or hung in C
    phases: dict[int, str] = field(default_factory=dict)  # where each live peer is
    where: dict[int, str] = field(default_factory=dict)  # "pid P on host H" of each registered peer
    store_error: str | None = None  # the store did not answer: rank 0, its host, is dead or stopped
    wait_s: float = ROLL_CALL_S


def roll_call(rank: int, peers: Sequence[int], wait_s: float = ROLL_CALL_S) -> RollCall | None:
    """Ping `peers` through the store and wait up to `wait_s` for answers; None without a store."""
    store = _tcp_store()
    if store is None:
        return None
    rc = RollCall(asked=list(peers), wait_s=wait_s)
    try:
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        for p in peers:
            store.set(f"{_KEY}ping/{p}", str(rank))
        pending, deadline = set(peers), time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if not store.check([f"{_KEY}pong/{p}"])}
            if pending:
                time.sleep(0.05)
        rc.silent = sorted(pending)
        for p in peers:
            if p not in pending:
                rc.phases[p] = json.loads(store.get(f"{_KEY}pong/{p}"))["phase"]
            if store.check([f"{_KEY}where/{p}"]):
                w = json.loads(store.get(f"{_KEY}where/{p}"))
                rc.where[p] = f"pid {w['pid']} on {w['host']}"
    except Exception as e:  # noqa: BLE001 - a store that fails is itself the diagnosis
        rc.store_error = first_line(e)
    return rc


def first_line(e: BaseException) -> str:
    """The first line of an exception's text, without gloo's source location and advice."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line)  # gloo's source location prefix
    return re.sub(r"\.?\s*This is typically caused by .*$", "", line)  # gloo's boilerplate advice


def peers_to_ask(topo: Any) -> list[int]:
    """Everyone in a small job; in a large one the ranks this rank exchanges with directly. A
    fault-tolerant replica job asks its own ranks: the other replicas are torchft's to judge."""
    if getattr(topo, "fault_tolerant", False):
        return [r for r in range(topo.ranks_per_replica) if r != topo.rank]
    if topo.world_size <= ASK_ALL_UP_TO:
        return [r for r in range(topo.world_size) if r != topo.rank]
    near = set(topo.replica_ranks(topo.replica_id)) | set(topo.outer_ranks(topo.shard_id))
    return sorted(near - {topo.rank})


def explain(rc: RollCall | None, topo: Any | None) -> str:
    """One sentence on who is missing, from a roll call's answers."""
    def who(r: int) -> str:
        parts = [f"replica {r // topo.ranks_per_replica}, shard {r % topo.ranks_per_replica}"] if topo else []
        if r in rc.where:
            parts.append(rc.where[r])
        return f"rank {r}" + (f" ({', '.join(parts)})" if parts else "")

    if rc is None:
        return "A peer rank died or hangs"
    if rc.store_error is not None:
        host = os.environ.get("MASTER_ADDR", "?")
        return (f"The rendezvous store hosted by rank 0 ({host}) does not answer ({rc.store_error}): rank 0 died, is "
                f"stopped or hangs")
    if rc.silent:
        names = "; ".join(who(r) for r in rc.silent)
        return f"{names[0].upper()}{names[1:]} did not answer a roll call within {rc.wait_s:g} s: dead, stopped or hung"
    if rc.asked:
        where = "; ".join(f"rank {r} is in {rc.phases[r]}" for r in sorted(rc.phases)[:8])
        return (f"Every peer asked ({len(rc.asked)}) answered a roll call, so none is dead or stopped; look for the "
                f"one that is behind: {where}")
    return "A peer rank died or hangs"


def peer_failure(exc: BaseException, rank: int, phase: str, topo: Any | None) -> PeerFailureError:
    """The user-facing error for a failed collective: where this rank was, what the backend
    said, who did not answer a roll call, and what to do."""
    rc = roll_call(rank, peers_to_ask(topo)) if topo is not None else None
    fix = ("restart every rank with --resume to continue from the last checkpoint" if not getattr(topo, "fault_tolerant", False)
           else f"this replica's job ends here and the other replicas carry on; start it again (same --replica-id "
                f"{topo.replica_id}) and it rejoins at their next outer sync")
    return PeerFailureError(f"rank {rank}: a collective failed during {phase}: {first_line(exc)}. "
                            f"{explain(rc, topo)}; {fix}.")
