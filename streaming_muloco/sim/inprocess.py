"""Collectives between K replicas that live in ONE process, for the single-process simulator.

Each replica gets its own `InProcessBackend` over a shared `InProcessGroup`. A launch posts
this rank's tensor into the group's slot for the rank's next collective sequence number and
returns at once; `wait()` computes the result from all K posts. Nothing is sent anywhere, but
the bytes are counted with `wire_bytes` exactly as the torch backend counts them, so the
simulator reports the traffic a real job would put on the wire.

Ordering is the caller's job, as with real collectives: every rank must launch collective n
before any rank waits on it. With one thread that means running each outer-sync phase for all
K replicas before the next phase; waiting early raises a RuntimeError instead of hanging.
An exchange that launches a second collective inside `wait()` (two-phase) needs one thread per
replica: give the group a `wait_timeout_s` and `wait()` blocks until the others have posted.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..comm.base import CommBackend, Handle, wire_bytes


@dataclass
class _Slot:
    """The posts of one collective (one sequence number) from all ranks."""

    op: str
    posts: list[Any]
    collected: int = 0
    result: Any = field(default=None, repr=False)  # an all-reduce sum, computed once

    def missing(self) -> list[int]:
        return [r for r, p in enumerate(self.posts) if p is None]


class InProcessGroup:
    """K ranks' mailboxes, one slot per collective sequence number.

    Args:
        size: K, the number of ranks (replicas).
        wait_timeout_s: 0 (default) makes a premature `wait()` raise at once (single-threaded
            simulator); > 0 lets it block that long for the other ranks (one thread per rank).
    """

    def __init__(self, size: int, wait_timeout_s: float = 0.0) -> None:
        if size < 1:
            raise ValueError(f"InProcessGroup size ({size}) must be >= 1")
        if wait_timeout_s < 0:
            raise ValueError(f"InProcessGroup wait_timeout_s ({wait_timeout_s}) must be >= 0")
        self.size = size
        self.wait_timeout_s = wait_timeout_s
        self._slots: dict[int, _Slot] = {}
        self._cond = threading.Condition()

    def post(self, seq: int, rank: int, op: str, payload: Any) -> None:
        with self._cond:
            slot = self._slots.setdefault(seq, _Slot(op, [None] * self.size))
            if slot.op != op:
                raise RuntimeError(f"in-process collective #{seq}: rank {rank} launched {op} but another rank "
                                   f"launched {slot.op}; every replica must launch collectives in the same order")
            if slot.posts[rank] is not None:
                raise RuntimeError(f"in-process collective #{seq}: rank {rank} posted twice")
            slot.posts[rank] = payload
            self._cond.notify_all()

    def complete(self, seq: int) -> bool:
        with self._cond:
            slot = self._slots.get(seq)
            return slot is not None and not slot.missing()

    def collect(self, seq: int, rank: int, reduce: Any = None) -> Any:
        """All K posts of collective `seq` (or `reduce(posts)`, computed once for all ranks)."""
        with self._cond:
            slot = self._slots[seq]
            if slot.missing() and self.wait_timeout_s > 0:
                self._cond.wait_for(lambda: not slot.missing(), timeout=self.wait_timeout_s)
            if slot.missing():
                how = (f"within {self.wait_timeout_s:g} s" if self.wait_timeout_s > 0 else
                       "yet: a single-threaded simulator must launch it on every replica before waiting on "
                       "any (run each outer-sync phase for all replicas before the next), or run one thread per "
                       "replica (simulate(replica_threads=True), InProcessGroup(wait_timeout_s > 0))")
                raise RuntimeError(f"in-process collective #{seq} ({slot.op}): rank {rank} waited, but ranks "
                                   f"{slot.missing()} have not posted {how}")
            if reduce is not None and slot.result is None:
                slot.result = reduce(slot.posts)
            out = slot.result if reduce is not None else slot.posts
            slot.collected += 1
            if slot.collected == self.size:
                del self._slots[seq]
            return out


def _sum_in_rank_order(posts: list[torch.Tensor]) -> torch.Tensor:
    """Rank 0 + rank 1 + ... + rank K-1, left to right, so results are deterministic."""
    total = posts[0].clone()
    for t in posts[1:]:
        total += t
    return total


class InProcessBackend(CommBackend):
    """One replica's end of an `InProcessGroup`; same interface and byte count as TorchBackend."""

    name = "inprocess"

    def __init__(self, group: InProcessGroup, rank: int) -> None:
        if not 0 <= rank < group.size:
            raise ValueError(f"InProcessBackend rank ({rank}) must be in [0, {group.size})")
        super().__init__(size=group.size, rank=rank)
        self.group = group
        self._seq = 0

    def _post(self, op: str, payload: Any) -> int:
        seq = self._seq
        self._seq += 1
        self.group.post(seq, self.rank, op, payload)
        return seq

    def _handle(self, seq: int, finish: Any) -> Handle:
        return Handle(finish, lambda: self.group.complete(seq))

    def all_reduce_sum(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_reduce", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: tensor)
        # A copy is what goes on the wire: later in-place writes by the caller must not leak in.
        seq = self._post("all_reduce", tensor.detach().clone())

        def finish() -> torch.Tensor:
            total = self.group.collect(seq, self.rank, reduce=self._checked_sum(seq))
            tensor.copy_(total)
            return tensor

        return self._handle(seq, finish)

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_gather", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: [tensor])
        seq = self._post("all_gather", tensor.detach().clone())

        def finish() -> list[torch.Tensor]:
            posts = self.group.collect(seq, self.rank)
            self._check_shapes(seq, posts)
            return [p.clone() for p in posts]  # fresh tensors per rank, as a real all_gather gives

        return self._handle(seq, finish)

    def all_to_all(self, chunks: list[torch.Tensor]) -> Handle:
        if len(chunks) != self.size:
            raise ValueError(f"all_to_all needs one chunk per rank ({self.size}), got {len(chunks)}")
        total = sum(c.numel() * c.element_size() for c in chunks)
        self.bytes_sent += wire_bytes("all_to_all", total, self.size)
        if self.size == 1:
            return Handle(lambda: list(chunks))
        seq = self._post("all_to_all", [c.detach().clone() for c in chunks])

        def finish() -> list[torch.Tensor]:
            posts = self.group.collect(seq, self.rank)
            return [posts[j][self.rank].clone() for j in range(self.size)]

        return self._handle(seq, finish)

    def _checked_sum(self, seq: int) -> Any:
        def reduce(posts: list[torch.Tensor]) -> torch.Tensor:
            self._check_shapes(seq, posts)
            return _sum_in_rank_order(posts)

        return reduce

    @staticmethod
    def _check_shapes(seq: int, posts: list[torch.Tensor]) -> None:
        shapes = [(tuple(p.shape), p.dtype) for p in posts]
        if len(set(shapes)) > 1:
            raise RuntimeError(f"in-process collective #{seq}: ranks posted different shapes/dtypes {shapes}; "
                               f"every replica must send tensors of the same layout")
