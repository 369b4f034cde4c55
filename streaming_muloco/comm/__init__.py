"""Outer-loop collectives across replicas: one interface (`base`), a torch.distributed and an MPI
backend, and the in-process one the simulator uses. The factory lives here, above the backends,
so that `base` imports none of them."""
from __future__ import annotations

from typing import Any

from .base import CommBackend, Handle, wire_bytes


def make_backend(name: str, topo: Any, timeout_s: float) -> CommBackend:
    """Build the configured backend for this rank's outer group (the names config accepts)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(topo)
    if name == "mpi":
        from .mpi_backend import MPIBackend
        return MPIBackend(topo, timeout_s)
    raise ValueError(f"unknown comm backend {name!r}; use 'torch' or 'mpi'")


__all__ = ["CommBackend", "Handle", "make_backend", "wire_bytes"]
