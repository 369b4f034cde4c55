"""Replicas as independent jobs on torchft: a quorum per outer sync, a commit vote, healing.

Each rank of a replica job runs a torchft `Manager` (rank 0 hosts its ManagerServer, which
heartbeats to the Lighthouse). Every fragment sync is one torchft step (docs/design.md §6):

    begin_sync: start_quorum (a joiner is healed here: it receives theta_g, the outer momentum
                and the schedule position from a peer) -> reconfigure the process group ->
                launch the sync's metadata all-gather (replica id, config fingerprint, whether
                this replica contributes, step, phase, start time)
    ... the pseudo-gradient collective, then at finish:
    commit:     check the metadata -> `should_commit`, the vote of this replica's D ranks. A
                failed collective anywhere in the replica drops the sync here; a replica whose
                peers committed it falls one torchft step behind and is healed from one of them
                at the next quorum, so every survivor holds the same theta_g again.

A dropped sync loses nothing: theta_g and the outer momentum were not touched, the local
progress stays, and the error-feedback residual is put back, so the fragment's next round sends
the whole pseudo-gradient since its last committed sync.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch

from .comm.diagnose import first_line
from .comm.ft_backend import FTBackend
from .errors import ConfigError, PeerFailureError

log = logging.getLogger("streaming_muloco")

STARTUP, SYNC = 0, 1  # the phase field of a sync's metadata
_COMMITS = (1 << 32) - 1  # low bits of torchft's step: this replica's committed syncs


def torchft_step(position: int, commits: int) -> int:
    """torchft heals every replica whose step is below the quorum's highest. Its own counter
    counts commits only, which misses a replica that a quorum left out (a straggler past the
    Lighthouse's join timeout, a replica that hung and came back): that one requests a quorum
    for an older sync than its peers and, if their round there was dropped, has the same count.
    So the step is (inner step of the sync, commits), compared in that order: a replica behind in
    position or, at the same position, in commits, is healed (docs/design.md §6.1)."""
    return (position << 32) | (commits & _COMMITS)


def lighthouse_url(address: str) -> str:
    """torchft's clients need a URL; users write HOST:PORT as printed by our lighthouse."""
    return address if "://" in address else f"http://{address}"


def fingerprint_hash(fingerprint: dict[str, Any]) -> int:
    """63 bits of sha256 over the canonical JSON: equal configs give equal numbers on every host."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class FTStats:
    """What result.json and TensorBoard report about membership."""

    quorum_history: list[tuple[int, int]] = field(default_factory=list)  # (step, quorum size)
    joins: int = 0
    drops: int = 0
    heals: list[dict[str, float]] = field(default_factory=list)  # {step, seconds}
    failures: list[dict[str, float]] = field(default_factory=list)  # {step, fragment, seconds_lost}

    def summary(self) -> dict[str, Any]:
        return {"quorum_history": self.quorum_history, "joins": self.joins, "drops": self.drops,
                "heals": self.heals, "failures": self.failures}


class FaultTolerance:
    """torchft membership of one rank of one replica job.

    Args:
        replica_id, shard_id, ranks_per_replica: where this rank sits.
        ft: the `fault_tolerance` config section.
        fingerprint: what must be equal across replicas (model, P, H, compression).
        device: where the metadata tensor lives (NCCL needs a device tensor).
        send_state / receive_state: the state a joiner gets from a peer, and applying it.
        metrics: the run's MetricsLogger.
    """

    def __init__(self, replica_id: int, shard_id: int, ranks_per_replica: int, ft: Any, fingerprint: dict[str, Any],
                 device: torch.device, send_state: Callable[[], dict], receive_state: Callable[[dict], None],
                 metrics: Any) -> None:
        from torchft import Manager
        from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

        self.replica_id, self.shard_id = replica_id, shard_id
        self.fingerprint = fingerprint
        self.fp_hash = fingerprint_hash(fingerprint)
        self.device, self.metrics = device, metrics
        self._send_state, self._receive_state = send_state, receive_state
        self.started_ns = time.time_ns()
        timeout = timedelta(seconds=ft.timeout_s)
        self.pg = ProcessGroupNCCL(timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.lighthouse = ft.lighthouse
        try:
            self.manager = Manager(
                pg=self.pg, load_state_dict=self._received, state_dict=self._to_send,
                min_replica_size=ft.min_replicas, use_async_quorum=False, timeout=timeout,
                quorum_timeout=timedelta(seconds=ft.quorum_timeout_s), connect_timeout=timeout,
                rank=shard_id, world_size=ranks_per_replica, replica_id=f"replica{replica_id}",
                lighthouse_addr=lighthouse_url(ft.lighthouse), init_sync=False,
                heartbeat_interval=timedelta(milliseconds=100))
        except Exception as e:  # noqa: BLE001 - torchft raises plain RuntimeErrors from Rust
            raise PeerFailureError(f"replica {replica_id}: cannot reach the coordinator at {ft.lighthouse} "
                                   f"(streaming_muloco.fault_tolerance.lighthouse): {first_line(e)}; start it with "
                                   f"`python -m streaming_muloco.lighthouse --port PORT --min-replicas M` and pass "
                                   f"its HOST:PORT to --lighthouse", every_rank=True) from None
        self.comm = FTBackend(self.pg, self.manager.report_error, ft.timeout_s)
        self.stats = FTStats()
        self.healed = False  # during the current sync: this replica was healed at its quorum
        self.healed_step = 0
        self._meta_handle: Any = None
        self._meta: list[list[int]] | None = None
        self._members: set[int] | None = None
        self._lost_since: float | None = None  # a dropped sync's time, until the next commit
        self._sync_at = (0, STARTUP)  # (step, phase) of the sync in progress, as its metadata says

    # ---- torchft's state-transfer hooks ----------------------------------------------------
    def _to_send(self) -> dict:
        return self._send_state()

    def _received(self, state: dict) -> None:
        theirs = state.get("fingerprint")
        if theirs != self.fingerprint:
            diff = sorted(k for k in set(theirs or {}) | set(self.fingerprint)
                          if (theirs or {}).get(k) != self.fingerprint.get(k))
            raise ConfigError(f"replica {self.replica_id}: this job's config differs from the running replicas' in "
                              f"{', '.join(diff)} (theirs: {', '.join(f'{k}={(theirs or {}).get(k)}' for k in diff)}); "
                              f"start it with the same config")
        self._receive_state(state)
        self.healed, self.healed_step = True, int(state["inner_steps"])

    # ---- one sync ----------------------------------------------------------------------------
    def begin_sync(self, step: int, phase: int = SYNC) -> None:
        """Quorum (healing this replica if it is behind), then the sync's metadata exchange."""
        t0 = time.perf_counter()
        self.healed = False
        commits = self.manager.current_step() & _COMMITS
        # start-up ranks below every running replica, so a starting job always heals into them
        self.manager.load_state_dict({"step": torchft_step(step if phase == SYNC else 0, commits),
                                      "batches_committed": self.manager.batches_committed()})
        try:
            self.manager.start_quorum()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - no quorum: torchft raises a RuntimeError/TimeoutError
            raise PeerFailureError(f"replica {self.replica_id}: no quorum of at least min_replicas replicas at "
                                   f"inner step {step} within fault_tolerance.quorum_timeout_s: {first_line(e)}",
                                   every_rank=True) from None
        if self.healed:  # now at the peers' step, inside their sync (a joiner leaves its start-up)
            step, phase = self.healed_step, SYNC
            seconds = time.perf_counter() - t0
            self.stats.heals.append({"step": step, "seconds": seconds})
            self.metrics.scalar("ft/heal_s", seconds, step)
            log.warning("replica %d: joined at inner step %d with a peer's state (%.2f s)", self.replica_id, step,
                        seconds)
        size = self.manager.num_participants()
        rank = self.manager.participating_rank()
        self.comm.reconfigure(size, rank if rank is not None else 0, self._contributors)
        meta = torch.tensor([self.replica_id, self.fp_hash, 0 if self.healed else 1, step, phase, self.started_ns],
                            dtype=torch.int64, device=self.device)
        self._meta, self._meta_handle = None, self.comm.all_gather(meta)
        self._sync_at = (step, phase)
        self.stats.quorum_history.append((step, size))
        self.metrics.scalar("ft/quorum_size", size, step)
        if self._lost_since is not None:
            self.stats.failures[-1]["seconds_lost"] += time.perf_counter() - t0

    def metadata(self) -> list[list[int]]:
        """The quorum's metadata rows, one per member in replica-rank order."""
        if self._meta is None:
            self._meta = [row.tolist() for row in self._meta_handle.wait()]
        return self._meta

    def _contributors(self) -> int:
        return sum(row[2] for row in self.metadata())

    def check_members(self) -> None:
        """Refuse a duplicate replica id or a different config; count joins and drops."""
        step, phase = self._sync_at
        rows = self.metadata()
        if self.manager.errored():
            return  # a member failed mid-exchange: the rows are not trustworthy, and the vote drops the sync
        ids = [r[0] for r in rows]
        mine = rows[self.comm.rank]
        for r in rows:
            if r is not mine and r[0] == self.replica_id:
                self.manager.report_error(RuntimeError("duplicate replica id"))
                if r[5] < mine[5]:  # the job that started later is the duplicate
                    raise ConfigError(f"--replica-id {self.replica_id} is already running in this run; give each "
                                      f"replica job its own id in [0, num_replicas)")
        reference = min(rows, key=lambda r: (r[0], r[5]))
        if mine[1] != reference[1]:
            self.manager.report_error(RuntimeError("config fingerprint differs"))
            raise ConfigError(f"replica {self.replica_id}: this job's config differs from replica {reference[0]}'s "
                              f"(model, num_fragments, sync_every, compression or ZeRO stage): start every replica "
                              f"with the same config")
        if any(r[1] != reference[1] for r in rows):
            self.manager.report_error(RuntimeError("a member's config differs"))
        if any((r[3], r[4]) != (step, phase) for r in rows):
            where = ", ".join(f"replica {r[0]} at step {r[3]}" for r in rows)
            self.manager.report_error(RuntimeError(f"members at different steps: {where}"))
            if phase == STARTUP:
                raise PeerFailureError(f"replica {self.replica_id}: the replicas resumed at different steps ({where}); "
                                       f"resume every replica from the same step, e.g. --resume "
                                       f"OUT_DIR/replica{{k}}/checkpoints/step{min(r[3] for r in rows)}",
                                       every_rank=True)
        members = set(ids)
        if self._members is not None:
            self.stats.joins += len(members - self._members)
            self.stats.drops += len(self._members - members)
        self._members = members
        self.metrics.scalars({"ft/joins": self.stats.joins, "ft/drops": self.stats.drops}, step)

    def commit(self, step: int, fragment_id: int, started: float | None = None) -> bool:
        """The commit vote of this replica's ranks; False drops the sync (see the module doc)."""
        self.check_members()
        try:
            ok = self.manager.should_commit()
        except Exception as e:  # noqa: BLE001 - a rank of this replica is gone: this job ends
            raise PeerFailureError(f"replica {self.replica_id} rank {self.shard_id}: the commit vote of inner step "
                                   f"{step} failed ({first_line(e)}): a rank of this replica died or hangs; this "
                                   f"replica's job ends and the others carry on") from None
        if ok:
            if self._lost_since is not None:  # the first commit after a dropped sync: its cost is known
                self.metrics.scalar("ft/seconds_lost", self.stats.failures[-1]["seconds_lost"], step)
            self._lost_since = None
        else:
            lost = time.perf_counter() - started if started is not None else 0.0
            self.stats.failures.append({"step": step, "fragment": fragment_id, "seconds_lost": lost})
            self._lost_since = time.perf_counter()
            log.warning("replica %d: outer sync of fragment %d at inner step %d dropped (%s); it is sent again in "
                        "the fragment's next round", self.replica_id, fragment_id, step,
                        first_line(self.manager.errored()) if self.manager.errored() else "a peer failed")
        self.metrics.scalar("ft/dropped_syncs", len(self.stats.failures), step)
        return ok

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)

