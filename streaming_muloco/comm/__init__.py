"""Outer-loop collectives across replicas: one interface, a torch.distributed and an MPI backend."""
from .base import CommBackend, Handle, make_backend

__all__ = ["CommBackend", "Handle", "make_backend"]
