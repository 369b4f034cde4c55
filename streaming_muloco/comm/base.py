"""The interface the outer loop talks to: launch a collective now, wait for it later.

The launch/wait split is what lets a fragment's exchange overlap the next sync_delay inner
steps (docs/design.md §1, §3). Each backend works on the outer group: the K ranks that hold the
same ZeRO shard index, one per replica.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch


class Handle:
    """A collective in flight. `wait()` blocks until it is done and returns its result."""

    def __init__(self, wait_fn: Callable[[], Any], test_fn: Callable[[], bool] | None = None) -> None:
        self._wait_fn = wait_fn
        self._test_fn = test_fn
        self._done = False
        self._result: Any = None

    def wait(self) -> Any:
        if not self._done:
            self._result = self._wait_fn()
            self._done = True
        return self._result

    def test(self) -> bool:
        """True once the collective has completed (it may still need `wait()` to unpack)."""
        if self._done:
            return True
        return bool(self._test_fn()) if self._test_fn is not None else False

    def poke(self) -> None:
        """Give a backend that does not progress on its own a chance to move (MPI)."""
        self.test()


class CommBackend(abc.ABC):
    """Async collectives over the outer group (size K)."""

    name: str = "base"

    def __init__(self, size: int, rank: int) -> None:
        self.size = size
        self.rank = rank
        self.bytes_sent = 0  # bytes this rank handed to collectives, for the wire accounting

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> Handle:
        """Sum `tensor` in place across the group; the handle returns it."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> Handle:
        """Gather equal-sized 1-D tensors; the handle returns a list of `size` tensors."""

    @abc.abstractmethod
    def all_to_all(self, chunks: list[torch.Tensor]) -> Handle:
        """Send chunks[j] to rank j; the handle returns the list received, one per rank."""

    def mean_divisor(self) -> int:
        """What the sum of the contributions is divided by: the group size, except where some
        members send zeros that must not count (a fault-tolerant quorum's healed replicas)."""
        return self.size

    def close(self) -> None:
        pass


def wire_bytes(op: str, nbytes: int, size: int) -> int:
    """Bytes one rank puts on the wire for `op` under the ring model (what DDP is judged by).

    - all_reduce of n bytes: 2*(K-1)/K*n (reduce-scatter + all-gather);
    - all_gather of an n-byte contribution: (K-1)*n (it forwards every other rank's piece);
    - all_to_all of n bytes in total: (K-1)/K*n (it keeps its own chunk).
    """
    if size <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (size - 1) * nbytes // size
    if op == "all_gather":
        return (size - 1) * nbytes
    if op == "all_to_all":
        return (size - 1) * nbytes // size
    raise ValueError(f"unknown collective {op}")
