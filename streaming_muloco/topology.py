"""Process groups for K replicas x D ZeRO ranks: the one place groups are created.

Global rank r belongs to replica k = r // D and holds ZeRO shard d = r % D.
- The replica group {k*D + d' : d'} is DeepSpeed's data-parallel group, so gradient traffic
  never leaves a replica.
- The outer group {k'*D + d : k'} joins the ranks that hold the same shard index, so the
  outer sync exchanges only 1/D of the model per rank.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .comm.base import Handle


@dataclass
class Topology:
    """Ranks and groups of one process; build with `Topology.build` after init_process_group."""

    num_replicas: int  # K
    ranks_per_replica: int  # D
    rank: int
    replica_group: Any = field(default=None, repr=False)
    outer_group: Any = field(default=None, repr=False)
    self_group: Any = field(default=None, repr=False)
    # Set when this job is one replica of a fault-tolerant run (`build_replica_job`): then the
    # process group holds this replica's D ranks only, and torchft carries the outer group.
    job_replica_id: int | None = None

    @property
    def fault_tolerant(self) -> bool:
        return self.job_replica_id is not None

    @property
    def world_size(self) -> int:
        return self.num_replicas * self.ranks_per_replica

    @property
    def replica_id(self) -> int:
        return self.job_replica_id if self.job_replica_id is not None else self.rank // self.ranks_per_replica

    @property
    def global_rank(self) -> int:
        """k*D + d: the rank this process would have in a single job of all K replicas (data streams)."""
        return self.replica_id * self.ranks_per_replica + self.shard_id

    @property
    def shard_id(self) -> int:
        return self.rank % self.ranks_per_replica

    def replica_ranks(self, k: int) -> list[int]:
        D = self.ranks_per_replica
        return list(range(k * D, (k + 1) * D))

    def outer_ranks(self, d: int) -> list[int]:
        return [k * self.ranks_per_replica + d for k in range(self.num_replicas)]

    @classmethod
    def build(cls, num_replicas: int, ranks_per_replica: int, timeout_s: float | None = None) -> "Topology":
        """Create every group. Collective: all ranks must call it, in the same order.

        `timeout_s` bounds every collective on these groups: without it torch gives new groups
        a 30-minute default, and a hung peer would freeze the survivors that long.
        """
        topo = cls(num_replicas, ranks_per_replica, dist.get_rank())
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        if topo.world_size != dist.get_world_size():
            raise ValueError(f"num_replicas ({num_replicas}) x ranks_per_replica ({ranks_per_replica}) != "
                             f"world size ({dist.get_world_size()})")
        # new_group is collective over the world: every rank creates every group.
        for k in range(num_replicas):
            g = dist.new_group(topo.replica_ranks(k), timeout=timeout)
            if k == topo.replica_id:
                topo.replica_group = g
        for d in range(ranks_per_replica):
            g = dist.new_group(topo.outer_ranks(d), timeout=timeout)
            if d == topo.shard_id:
                topo.outer_group = g
        for r in range(topo.world_size):
            g = dist.new_group([r], timeout=timeout)
            if r == topo.rank:
                topo.self_group = g
        return topo

    @classmethod
    def build_replica_job(cls, num_replicas: int, ranks_per_replica: int, replica_id: int,
                          timeout_s: float | None = None) -> "Topology":
        """The groups of one replica running as its own job (fault tolerance): the world is the
        replica. The outer group is not here: torchft's Manager builds it per quorum."""
        if dist.get_world_size() != ranks_per_replica:
            raise ValueError(f"a replica job has {dist.get_world_size()} ranks, expected {ranks_per_replica}")
        topo = cls(num_replicas, ranks_per_replica, dist.get_rank(), job_replica_id=replica_id)
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        topo.replica_group = dist.new_group(list(range(ranks_per_replica)), timeout=timeout)
        for r in range(ranks_per_replica):
            g = dist.new_group([r], timeout=timeout)
            if r == topo.rank:
                topo.self_group = g
        return topo

    def replica_sum_async(self, tensor: torch.Tensor) -> Handle:
        """Sum a small tensor over this replica's D ranks in the background (metrics)."""
        work = dist.all_reduce(tensor, group=self.replica_group, async_op=True)
        return Handle(lambda: (work.wait(), tensor)[1], work.is_completed)

    def mpu(self) -> "ReplicaMPU":
        return ReplicaMPU(self)


class ReplicaMPU:
    """The model-parallel-unit interface DeepSpeed reads its data-parallel group from.

    Passing it to `deepspeed.initialize(mpu=...)` makes each replica its own ZeRO group; there
    is no model parallelism, so the model-parallel group is the rank alone.
    """

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_data_parallel_group(self) -> Any:
        return self.topo.replica_group

    def get_data_parallel_world_size(self) -> int:
        return self.topo.ranks_per_replica

    def get_data_parallel_rank(self) -> int:
        return self.topo.shard_id

    def get_model_parallel_group(self) -> Any:
        return self.topo.self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0
