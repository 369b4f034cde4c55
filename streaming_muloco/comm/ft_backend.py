"""The outer collectives of a fault-tolerant run: torchft's reconfigurable process group.

Membership changes between syncs (docs/design.md §6), so `size` and `rank` are set per quorum
by `FaultTolerance.begin_sync`, and the mean divides by the replicas that *contributed* (a
replica that was just healed sends exact zeros and is not counted). A collective that fails
does not raise here: the error goes to the torchft Manager, whose commit vote then drops the
sync on this replica; the others settle it the same way or heal this one at the next quorum.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
from torch.distributed.distributed_c10d import AllgatherOptions, AllreduceOptions, ReduceOp

from .base import CommBackend, Handle, wire_bytes


_A2A_TAG = 7  # the two-phase exchange's send/recv pairs; nothing else uses point-to-point here


class FTBackend(CommBackend):
    """Async collectives over the current quorum's process group (one rank per replica)."""

    name = "torchft"

    def __init__(self, pg: Any, report_error: Callable[[Exception], None], timeout_s: float) -> None:
        super().__init__(size=1, rank=0)
        self.pg = pg
        self.report_error = report_error
        self.timeout = timedelta(seconds=timeout_s)
        self.contributors: Callable[[], int] = lambda: self.size

    def reconfigure(self, size: int, rank: int, contributors: Callable[[], int]) -> None:
        """The quorum of the sync about to start: its size, this replica's rank in it, and how to
        learn how many replicas contributed (known once the sync's metadata has arrived)."""
        self.size, self.rank, self.contributors = size, rank, contributors

    def mean_divisor(self) -> int:
        return max(1, self.contributors())

    def _launch(self, launch: Callable[[], Any]) -> Any:
        try:
            return launch()
        except Exception as e:  # noqa: BLE001 - a dead peer: the commit vote drops this sync
            self.report_error(e)
            return None

    def _handle(self, work: Any, result: Any) -> Handle:
        def wait() -> Any:
            if work is not None:
                try:
                    work.wait(self.timeout)
                except Exception as e:  # noqa: BLE001 - as in _launch
                    self.report_error(e)
            return result

        def test() -> bool:
            try:
                return work is None or bool(work.is_completed())
            except Exception:  # noqa: BLE001 - wait() reports it
                return True

        return Handle(wait, test)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_reduce", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: tensor)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        return self._handle(self._launch(lambda: self.pg.allreduce([tensor], opts)), tensor)

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_gather", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: [tensor])
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        return self._handle(self._launch(lambda: self.pg.allgather([out], [tensor], AllgatherOptions())), out)

    def all_to_all(self, chunks: list[torch.Tensor]) -> Handle:
        total = sum(c.numel() * c.element_size() for c in chunks)
        self.bytes_sent += wire_bytes("all_to_all", total, self.size)
        out = [torch.empty_like(c) for c in chunks]
        out[self.rank].copy_(chunks[self.rank])
        works = []
        for j in range(self.size):  # gloo has no all_to_all: every send/recv pair posted at once
            if j != self.rank:
                works.append(self._launch(lambda j=j: self.pg.send([chunks[j]], j, _A2A_TAG)))
                works.append(self._launch(lambda j=j: self.pg.recv([out[j]], j, _A2A_TAG)))
        handles = [self._handle(w, None) for w in works]
        return Handle(lambda: ([h.wait() for h in handles], out)[1], lambda: all(h.test() for h in handles))
