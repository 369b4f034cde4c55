"""Where the outer state rests between syncs: on the engine's device, or in pinned host memory
(`streaming_muloco.outer_state_device`, docs/design.md §4).

θ_g, the outer momentum and the error-feedback residuals are 2-3x this rank's fp32 shard, and a
sync touches only one fragment of them. With "cpu" they rest in host memory (pinned where the
accelerator can pin), as torchft and INTELLECT-1 keep theirs. A sync fetches that fragment's
tensors to the device (a transient of one fragment), does exactly the math of the default there,
and puts the results back. On an accelerator the put-back is an asynchronous copy on a side
stream, so it overlaps the inner steps that follow; it is waited for before the host reads a
resting tensor (the next fetch, a checkpoint, a heal). The fetch is a host-to-device copy on
the compute stream, which the sync needs at once. Same math in the same order: bit-identical to
the default (tested on CPU, where the copies are plain copies between separate tensors).
"""
from __future__ import annotations

from typing import Any

import torch

PLACES = ("accelerator", "cpu")


class OuterStateStore:
    """Resting places for outer-state tensors, and the copies to and from the compute device."""

    def __init__(self, where: str, device: torch.device | str) -> None:
        if where not in PLACES:
            raise ValueError(f"outer_state_device '{where}' is unknown; use one of {list(PLACES)}")
        self.on_host = where == "cpu"
        self.device = torch.device(device)
        self._accelerator: Any = None
        self._stream: Any = None
        self._pending: list[Any] = []  # events of put-backs still copying
        if self.on_host and self.device.type != "cpu":
            from deepspeed.accelerator import get_accelerator

            self._accelerator = get_accelerator()
            self._stream = self._accelerator.Stream()

    def rest(self, t: torch.Tensor) -> torch.Tensor:
        """Where a new (or loaded) state tensor lives from now on: a pinned host copy with "cpu",
        else `t` itself on the engine's device."""
        if not self.on_host:
            return t if t.device == self.device else t.to(self.device)
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        if self._accelerator is not None:
            out = self._accelerator.pin_memory(out)
        out.copy_(t)
        return out

    def fetch(self, rest: torch.Tensor) -> torch.Tensor:
        """A working copy of a resting tensor on the engine's device (the tensor itself by default)."""
        if not self.on_host:
            return rest
        self.synchronize()
        return rest.to(self.device, copy=True, non_blocking=True)

    def put_back(self, rest: torch.Tensor, work: torch.Tensor) -> None:
        """Copy the working tensor's new value into its resting place (nothing to do by default)."""
        if work is rest:
            return
        if self._stream is None:
            rest.copy_(work)
            return
        acc = self._accelerator
        self._stream.wait_stream(acc.current_stream())  # after the math that produced `work`
        with acc.stream(self._stream):
            rest.copy_(work, non_blocking=True)
            event = acc.Event()
            event.record(self._stream)
        work.record_stream(self._stream)  # the allocator keeps `work` until the copy is done
        self._pending.append(event)

    def synchronize(self) -> None:
        """Wait for the put-backs still copying; call before the host reads a resting tensor."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

    @property
    def placement(self) -> str:
        """"host" or "device": where resting tensors use memory (on a CPU engine, host either way)."""
        return "host" if self.on_host or self.device.type == "cpu" else "device"
