"""torch.distributed backend: gloo on CPU, NCCL on GPU, with `async_op=True`."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .base import CommBackend, Handle, wire_bytes


class TorchBackend(CommBackend):
    """Async collectives on the topology's outer group (a torch.distributed ProcessGroup)."""

    name = "torch"

    def __init__(self, topo: Any) -> None:
        super().__init__(size=topo.num_replicas, rank=topo.replica_id)
        self.group = topo.outer_group

    def all_reduce_sum(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_reduce", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: tensor)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return Handle(lambda: (work.wait(), tensor)[1], work.is_completed)

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_gather", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: [tensor])
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        work = dist.all_gather(out, tensor, group=self.group, async_op=True)
        return Handle(lambda: (work.wait(), out)[1], work.is_completed)

    def all_to_all(self, chunks: list[torch.Tensor]) -> Handle:
        total = sum(c.numel() * c.element_size() for c in chunks)
        self.bytes_sent += wire_bytes("all_to_all", total, self.size)
        if self.size == 1:
            return Handle(lambda: list(chunks))
        out = [torch.empty_like(c) for c in chunks]
        if dist.get_backend(self.group) == "gloo":
            # gloo has no all_to_all: post every send/recv pair at once, which is the same traffic.
            ranks = dist.get_process_group_ranks(self.group)
            ops = []
            for j, peer in enumerate(ranks):
                if j == self.rank:
                    out[j].copy_(chunks[j])
                    continue
                ops.append(dist.P2POp(dist.isend, chunks[j], peer, group=self.group))
                ops.append(dist.P2POp(dist.irecv, out[j], peer, group=self.group))
            works = dist.batch_isend_irecv(ops)
            return Handle(lambda: ([w.wait() for w in works], out)[1], lambda: all(w.is_completed() for w in works))
        work = dist.all_to_all(out, list(chunks), group=self.group, async_op=True)
        return Handle(lambda: (work.wait(), out)[1], work.is_completed)
