"""Averaging pseudo-gradients across replicas, compressed or not (DESIGN §1, collectives).

- method "none": an fp32 all-reduce (sum, then / K).
- compressed, "single_phase": error feedback -> compress -> all-gather the packed payloads ->
  every rank decodes the K payloads and averages them (in replica order, so all agree bit for
  bit). Each rank sends (K-1) compressed vectors' worth under the ring model.
- compressed, "two_phase": the vector is cut in K chunks (block-aligned); chunk j of every
  replica goes to replica j (all-to-all of payloads), which decodes and averages them in fp32,
  re-compresses that mean with its own error feedback, and all-gathers it. Each rank sends
  about 2*(K-1)/K of one compressed vector. The second phase is launched as soon as the first
  is seen complete (by `poke()` during inner steps, or at the latest in `wait()`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .comm.base import CommBackend, Handle
from .compression import Compressor
from .compressors import make_compressor
from .config import CompressionConfig
from .error_feedback import ErrorFeedback


def _mean_of_payloads(compressor: Compressor, bufs: list[torch.Tensor], numel: int) -> torch.Tensor:
    """Decode K flat payloads and average them in rank order (deterministic on every rank)."""
    total = compressor.decompress(compressor.unflatten(bufs[0], numel)).clone()
    for buf in bufs[1:]:
        total.add_(compressor.decompress(compressor.unflatten(buf, numel)))
    return total.div_(len(bufs))


class _TwoPhase(Handle):
    """all-to-all of chunk payloads, then (once that is done) all-gather of re-compressed means."""

    def __init__(self, exchange: "PseudoGradExchange", fragment_id: int, numel: int, first: Handle) -> None:
        super().__init__(self._finish)
        self.x, self.p, self.numel, self.first = exchange, fragment_id, numel, first
        self.second: Handle | None = None

    def _launch_second(self) -> None:
        x, chunk = self.x, self.x.chunk_numel(self.numel)
        received = self.first.wait()
        mean_chunk = _mean_of_payloads(x.compressor, received, chunk)
        payload, _ = x.ef_second[self.p].step(mean_chunk, x.compressor)
        self.second = x.comm.all_gather(payload.to_flat_bytes())

    def poke(self) -> None:
        if self.second is None and self.first.test():
            self._launch_second()
        elif self.second is not None:
            self.second.poke()

    def _finish(self) -> torch.Tensor:
        if self.second is None:
            self._launch_second()
        chunk = self.x.chunk_numel(self.numel)
        parts = [self.x.compressor.decompress(self.x.compressor.unflatten(b, chunk)) for b in self.second.wait()]
        return torch.cat(parts)[: self.numel]


class PseudoGradExchange:
    """Launch the averaging of one fragment's pseudo-gradient; the handle yields the mean.

    Holds the per-fragment error-feedback buffers (first phase, and for two-phase the
    re-compression of this rank's chunk), so they are saved with the outer state.
    """

    def __init__(self, cfg: CompressionConfig, comm: CommBackend, num_fragments: int, outer_lr: float = 1.0) -> None:
        self.cfg = cfg
        self.comm = comm
        self.K = comm.size
        self.compressor = None if cfg.method == "none" else make_compressor(cfg.method, cfg.bits, cfg.block_size,
                                                                            cfg.topk_fraction)
        scale = outer_lr if cfg.ef_scale_by_outer_lr else 1.0

        def ef() -> ErrorFeedback:
            return ErrorFeedback(beta=cfg.ef_beta, enabled=cfg.error_feedback, scale=scale)

        two = cfg.collective == "two_phase"
        # Two-phase: one EF per chunk, so each chunk is its own payload (EF is elementwise and
        # chunks are block-aligned, so this equals EF over the whole vector).
        self.ef = [[ef() for _ in range(self.K if two else 1)] for _ in range(num_fragments)]
        self.ef_second = [ErrorFeedback(beta=cfg.ef_beta, enabled=cfg.error_feedback) for _ in range(num_fragments)]
        self._stats: dict[int, dict[str, float]] = {}

    def chunk_numel(self, numel: int) -> int:
        """Elements per two-phase chunk: ceil(numel/K), rounded up to whole blocks."""
        block = self.compressor.alignment if self.compressor is not None else 1
        return max(block, math.ceil(math.ceil(numel / self.K) / block) * block)

    def launch(self, fragment_id: int, delta: torch.Tensor) -> Handle:
        if self.compressor is None:
            send = delta.clone()
            work = self.comm.all_reduce_sum(send)
            self._stats[fragment_id] = {"comm/payload_bytes": float(send.numel() * send.element_size())}
            K = self.K
            return Handle(lambda: work.wait().div_(K), work.test)
        if self.cfg.collective == "two_phase":
            return self._launch_two_phase(fragment_id, delta)
        payload, sent = self.ef[fragment_id][0].step(delta, self.compressor)
        self._record(fragment_id, delta, sent, payload.nbytes, [self.ef[fragment_id][0]])
        work = self.comm.all_gather(payload.to_flat_bytes())
        numel = delta.numel()
        return Handle(lambda: _mean_of_payloads(self.compressor, work.wait(), numel), work.test)

    def _launch_two_phase(self, p: int, delta: torch.Tensor) -> Handle:
        n, chunk = delta.numel(), self.chunk_numel(delta.numel())
        padded = torch.zeros(chunk * self.K, dtype=torch.float32, device=delta.device)
        padded[:n] = delta
        bufs, sent_parts, nbytes = [], [], 0
        for j in range(self.K):
            payload, sent = self.ef[p][j].step(padded[j * chunk:(j + 1) * chunk], self.compressor)
            bufs.append(payload.to_flat_bytes())
            sent_parts.append(sent)
            nbytes += payload.nbytes
        self._record(p, delta, torch.cat(sent_parts)[:n], nbytes, self.ef[p])
        return _TwoPhase(self, p, n, self.comm.all_to_all(bufs))

    def _record(self, p: int, delta: torch.Tensor, sent: torch.Tensor, nbytes: int, efs: list[ErrorFeedback]) -> None:
        """Compression error of this rank's contribution, and what error feedback still holds."""
        norm = float(delta.norm())
        residual = math.sqrt(sum(float(e.residual.pow(2).sum()) for e in efs if e.residual is not None))
        self._stats[p] = {"comm/payload_bytes": float(nbytes),
                          "compress/relative_error": float((sent - delta).norm()) / norm if norm > 0 else 0.0,
                          "compress/ef_residual_norm": residual}

    def last_stats(self, fragment_id: int) -> dict[str, float]:
        return self._stats.get(fragment_id, {})

    def state_dict(self) -> dict[str, Any]:
        return {"ef": [[e.state_dict() for e in efs] for efs in self.ef],
                "ef_second": [e.state_dict() for e in self.ef_second]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for efs, saved in zip(self.ef, state["ef"]):
            for e, s in zip(efs, saved):
                e.load_state_dict(s)
        for e, s in zip(self.ef_second, state["ef_second"]):
            e.load_state_dict(s)
