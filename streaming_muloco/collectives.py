"""Averaging pseudo-gradients across replicas, compressed or not (docs/design.md §1 and §5).

Two calls per fragment sync, so the outer loop can hand what was computed to its observer
between them: `encode` (error feedback + compression) and `send` (launch the collective; the
handle's `wait()` returns the mean over the K replicas).

- method "none": an fp32 all-reduce of the pseudo-gradient buffer itself, in place (sum, then
  / K). Nothing is copied, so this rank's contribution is gone once the collective runs.
- compressed, "single_phase": error feedback -> compress -> all-gather the packed payloads ->
  every rank decodes the K payloads and averages them in replica order, so all agree bit for
  bit. This rank's own payload is not decoded again: error feedback already produced exactly
  what the others decode from it (`Encoded.own`), and that tensor takes its place in the sum.
  Each rank sends (K-1) compressed vectors' worth under the ring model.
- compressed, "two_phase": the vector is cut in K chunks (aligned to the compressor's blocks);
  chunk j of every replica goes to replica j (all-to-all of payloads), which decodes and
  averages them in fp32, re-compresses that mean with its own error feedback, and all-gathers
  it. Each rank sends about 2*(K-1)/K of one compressed vector. The second phase is launched
  as soon as the first is seen complete (by `poke()` during inner steps, or in `wait()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .comm.base import CommBackend, Handle
from .compression import Compressor
from .compressors import make_compressor
from .config import CompressionConfig
from .error_feedback import ErrorFeedback
from .outer_state import OuterStateStore
from .segments import ParamExtent, SegmentedCompressor, compressed_kinds, cut_segments, plan_segments


@dataclass
class Encoded:
    """One fragment's pseudo-gradient, ready for the wire.

    `own` is this replica's contribution to the mean exactly as every receiver decodes it,
    as pieces in element order (one per two-phase chunk; the last may run past `numel` into
    the padding); None for the uncompressed path, whose buffer the all-reduce overwrites.
    """

    wire: Any  # what the collective sends: a tensor (all-reduce, all-gather) or K chunks (all-to-all)
    numel: int
    payload_bytes: int
    own: list[torch.Tensor] | None = None
    residuals: list[torch.Tensor] = field(default_factory=list)  # error feedback after this round


def _mean_of_payloads(compressor: Compressor, bufs: list[torch.Tensor], numel: int, own_index: int,
                      own: torch.Tensor, divisor: int | None = None) -> torch.Tensor:
    """Decode K flat payloads and average them in rank order (deterministic on every rank).

    Slot `own_index` is this rank's payload, whose decoded value `own` is already known.
    `divisor` (default: the number of payloads) is how many of them count.
    """
    total: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    for j, buf in enumerate(bufs):
        if j == own_index:
            value = own
        else:
            payload = compressor.unflatten(buf, numel)
            if total is None:  # the first decode becomes the running sum: no copy needed
                value = compressor.decompress(payload)
            else:
                scratch = compressor.decompress(payload, out=scratch)
                value = scratch
        if total is None:
            total = value.clone() if j == own_index else value
            if scratch is None:
                scratch = torch.empty_like(total)
        else:
            total.add_(value)
    assert total is not None
    return total.div_(len(bufs) if divisor is None else divisor)


class _TwoPhase(Handle):
    """all-to-all of chunk payloads, then (once that is done) all-gather of re-compressed means."""

    def __init__(self, exchange: "PseudoGradExchange", fragment_id: int, enc: Encoded, first: Handle) -> None:
        super().__init__(self._finish)
        self.x, self.p, self.numel, self.first = exchange, fragment_id, enc.numel, first
        self.own_chunk = enc.own[exchange.comm.rank]  # this rank's chunk as its receiver decodes it
        self.second: Handle | None = None
        self.own_mean: torch.Tensor | None = None

    def _launch_second(self) -> None:
        x, chunk, k = self.x, self.x.chunk_numel(self.numel), self.x.comm.rank
        c = x.compressor_for(self.p, k)
        mine = c.payload_nbytes(chunk)  # the K payloads of this rank's chunk, without the padding
        bufs = [b[:mine] for b in self.first.wait()]
        mean_chunk = _mean_of_payloads(c, bufs, chunk, k, self.own_chunk, x.comm.mean_divisor())
        payload, self.own_mean = x.ef_second[self.p].step(mean_chunk, c)
        self.second = x.comm.all_gather(x.padded_chunk(self.p, payload.to_flat_bytes(), chunk))

    def poke(self) -> None:
        if self.second is None and self.first.test():
            self._launch_second()
        elif self.second is not None:
            self.second.poke()

    def _finish(self) -> torch.Tensor:
        if self.second is None:
            self._launch_second()
        chunk, k = self.x.chunk_numel(self.numel), self.x.comm.rank
        gathered = self.second.wait()
        out = torch.empty(chunk * len(gathered), dtype=torch.float32, device=gathered[0].device)
        for j, buf in enumerate(gathered):
            if j == k:
                out[j * chunk:(j + 1) * chunk].copy_(self.own_mean)
            else:
                c = self.x.compressor_for(self.p, j)
                c.decompress(c.unflatten(buf[:c.payload_nbytes(chunk)], chunk), out=out[j * chunk:(j + 1) * chunk])
        return out[: self.numel]


class PseudoGradExchange:
    """Encode and launch the averaging of one fragment's pseudo-gradient.

    Holds the per-fragment error-feedback buffers (first phase, and for two-phase the
    re-compression of this rank's chunk), so they are saved with the outer state.
    """

    def __init__(self, cfg: CompressionConfig, comm: CommBackend, num_fragments: int, outer_lr: float = 1.0,
                 store: OuterStateStore | None = None, extents: list[list[ParamExtent]] | None = None,
                 background: bool = False) -> None:
        self.cfg = cfg
        self.store = store
        self.comm = comm
        self.K = comm.size
        def new_compressor() -> Compressor:
            return make_compressor(cfg.method, cfg.bits, cfg.block_size, cfg.topk_fraction, stat_clip=cfg.stat_clip)

        self.compressor = None if cfg.method == "none" else new_compressor()
        # `encode` may run on a worker thread (outer_sync.py) while the training thread decodes
        # another fragment's payloads: a compressor's scratch buffers are not thread-safe, so
        # the encoder is then an instance of its own.
        self.background = background and self.compressor is not None
        self._encoder = new_compressor() if self.background else self.compressor
        # Parameter-aware compression (segments.py): one segment plan per fragment shard, and
        # a compressor per (fragment, two-phase chunk, K), made when first needed.
        self.plans = None
        if self.compressor is not None and cfg.granularity != "flat":
            if extents is None or len(extents) != num_fragments:
                raise ValueError(f"granularity {cfg.granularity!r} needs the parameter extents of all "
                                 f"{num_fragments} fragment shards")
            kinds = compressed_kinds(cfg.method, cfg.compress_vectors, cfg.compress_embedding, cfg.compress_head)
            self.plans = [plan_segments(e, cfg.granularity, cfg.block_size, kinds) for e in extents]
        self._segmented: dict[tuple[int, int, int, bool], Compressor] = {}
        scale = outer_lr if cfg.ef_scale_by_outer_lr else 1.0
        # s: the mean this exchange returns is the average of s·Δ (eager updates scale theirs alike)
        self.delta_scale = scale if self.compressor is not None else 1.0

        def ef() -> ErrorFeedback:
            return ErrorFeedback(beta=cfg.ef_beta, enabled=cfg.error_feedback, scale=scale, store=store)

        self._new_ef = ef
        two = cfg.collective == "two_phase"
        # Two-phase: one EF per chunk, so each chunk is its own payload (EF is elementwise and
        # chunks are block-aligned, so this equals EF over the whole vector).
        self.ef = [[ef() for _ in range(self.K if two else 1)] for _ in range(num_fragments)]
        self.ef_second = [ErrorFeedback(beta=cfg.ef_beta, enabled=cfg.error_feedback, store=store)
                          for _ in range(num_fragments)]

    def resize(self, K: int) -> None:
        """A new group size (a fault-tolerant quorum changed). Two-phase chunks follow K: each
        fragment's first-phase residuals are re-cut along the new chunks at its next encode (EF
        is elementwise, so the concatenated residual is the same vector); the second-phase
        residual belonged to the chunk this rank reduced, no longer its own, so it restarts at 0."""
        if K == self.K:
            return
        self.K = K
        if self.cfg.collective == "two_phase":
            for e in self.ef_second:
                e.residual = None

    def _recut(self, efs: list[ErrorFeedback], numel: int) -> list[ErrorFeedback]:
        fresh = [self._new_ef() for _ in range(self.K)]
        self._synchronize()
        kept = [e.residual for e in efs]
        if kept and all(r is not None for r in kept):
            whole, chunk = torch.cat(kept)[:numel], self.chunk_numel(numel)
            for j, e in enumerate(fresh):
                e.residual = torch.zeros(chunk, dtype=whole.dtype, device=whole.device)
                piece = whole[j * chunk:(j + 1) * chunk]
                e.residual[:piece.numel()] = piece
        return fresh

    def chunk_numel(self, numel: int) -> int:
        """Elements per two-phase chunk: ceil(numel/K), rounded up to the compressor's alignment
        (segmented compressors cut their plan anywhere: a cut block becomes two)."""
        block = self.compressor.alignment if self.compressor is not None and self.plans is None else 1
        return max(block, math.ceil(math.ceil(numel / self.K) / block) * block)

    def compressor_for(self, fragment_id: int, chunk: int | None = None, encoder: bool = False) -> Compressor:
        """The compressor of fragment `fragment_id` (of its two-phase `chunk`, when given); the
        encoder's own instance with `encoder` (see __init__)."""
        base = self._encoder if encoder else self.compressor
        assert base is not None
        if self.plans is None:
            return base
        plan = self.plans[fragment_id]
        key = (fragment_id, -1 if chunk is None else chunk, 0 if chunk is None else self.K, encoder)
        c = self._segmented.get(key)
        if c is None:
            if chunk is not None:
                n = self.chunk_numel(sum(s.numel for s in plan))
                plan = cut_segments(plan, chunk * n, (chunk + 1) * n)
            c = self._segmented[key] = SegmentedCompressor(base, plan)
        return c

    def padded_chunk(self, fragment_id: int, buf: torch.Tensor, chunk: int) -> torch.Tensor:
        """A two-phase chunk payload padded to the largest chunk payload of the fragment: the
        collectives move equal-sized buffers, and segmented chunks (cut at different places of
        the plan) differ by a few bytes. Flat block chunks are all one size: no copy."""
        width = max(self.compressor_for(fragment_id, j).payload_nbytes(chunk) for j in range(self.K))
        if buf.numel() == width:
            return buf
        out = torch.zeros(width, dtype=torch.uint8, device=buf.device)
        out[:buf.numel()] = buf
        return out

    def encode(self, fragment_id: int, delta: torch.Tensor) -> Encoded:
        """Error feedback and compression of `delta` (flat fp32); `delta` itself is not changed."""
        n = delta.numel()
        if self.compressor is None:
            return Encoded(wire=delta, numel=n, payload_bytes=n * delta.element_size())
        efs = self.ef[fragment_id]
        if self.cfg.collective == "single_phase":
            payload, sent = efs[0].step(delta, self.compressor_for(fragment_id, encoder=True))
            return Encoded(wire=payload.to_flat_bytes(), numel=n, payload_bytes=payload.nbytes, own=[sent],
                           residuals=_residuals(efs))
        if len(efs) != self.K:  # the quorum's size changed since this fragment's last round
            efs = self.ef[fragment_id] = self._recut(efs, n)
        chunk = self.chunk_numel(n)
        wire, own, nbytes = [], [], 0
        for j in range(self.K):
            piece = delta[j * chunk:(j + 1) * chunk]
            if piece.numel() < chunk:  # only the tail chunk is padded, with exact zeros
                padded = torch.zeros(chunk, dtype=torch.float32, device=delta.device)
                padded[:piece.numel()] = piece
                piece = padded
            payload, sent = efs[j].step(piece, self.compressor_for(fragment_id, j, encoder=True))
            wire.append(self.padded_chunk(fragment_id, payload.to_flat_bytes(), chunk))
            own.append(sent)
            nbytes += wire[-1].numel()
        return Encoded(wire=wire, numel=n, payload_bytes=nbytes, own=own, residuals=_residuals(efs))

    def send(self, fragment_id: int, enc: Encoded) -> Handle:
        """Launch the collective; the handle's `wait()` returns the mean pseudo-gradient."""
        if self.compressor is None:
            work = self.comm.all_reduce_sum(enc.wire)  # in place: no copy of the fragment
            comm = self.comm
            return Handle(lambda: work.wait().div_(comm.mean_divisor()), work.test)
        if self.cfg.collective == "two_phase":
            return _TwoPhase(self, fragment_id, enc, self.comm.all_to_all(enc.wire))
        work = self.comm.all_gather(enc.wire)
        own, numel, k, c, comm = enc.own[0], enc.numel, self.comm.rank, self.compressor_for(fragment_id), self.comm
        return Handle(lambda: _mean_of_payloads(c, work.wait(), numel, k, own, comm.mean_divisor()), work.test)

    def snapshot_ef(self, fragment_id: int) -> list[torch.Tensor | None]:
        """Copies of a fragment's residuals (first phase, then the second), to put back if its
        sync is dropped (fault tolerance: the dropped round's pseudo-gradient is sent again, whole,
        in the next round)."""
        self._synchronize()
        efs = self.ef[fragment_id] + [self.ef_second[fragment_id]]
        return [None if e.residual is None else e.residual.clone() for e in efs]

    def restore_ef(self, fragment_id: int, snapshot: list[torch.Tensor | None]) -> None:
        for e, saved in zip(self.ef[fragment_id] + [self.ef_second[fragment_id]], snapshot):
            e.residual = saved

    def reset_ef(self) -> None:
        """Zero every residual: a healed replica's state is its peer's, which holds no debt of ours."""
        self._synchronize()
        for e in [e for per_frag in self.ef for e in per_frag] + list(self.ef_second):
            e.reset()

    def ef_nbytes(self) -> int:
        """Bytes of error-feedback residuals this rank holds (both phases)."""
        efs = [e for per_frag in self.ef for e in per_frag] + list(self.ef_second)
        return sum(e.residual.numel() * e.residual.element_size() for e in efs if e.residual is not None)

    def _synchronize(self) -> None:
        if self.store is not None:
            self.store.synchronize()  # residual put-backs still copying (outer_state.py)

    def state_dict(self) -> dict[str, Any]:
        self._synchronize()
        return {"ef": [[e.state_dict() for e in efs] for efs in self.ef],
                "ef_second": [e.state_dict() for e in self.ef_second]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for efs, saved in zip(self.ef, state["ef"]):
            for e, s in zip(efs, saved):
                e.load_state_dict(s)
        for e, s in zip(self.ef_second, state["ef_second"]):
            e.load_state_dict(s)


def _residuals(efs: list[ErrorFeedback]) -> list[torch.Tensor]:
    """The residuals this encode left, where they were computed (for the observer). Taken, not
    kept: with the outer state in host memory each is a device copy that should not outlive
    the sync start."""
    out = [e.working for e in efs if e.working is not None]
    for e in efs:
        e.working = None
    return out
