"""What the outer loop reports: timings, pseudo-gradient norms, replica cosine, compression error.

`OuterSync` hands this observer what its data path already computed (the pseudo-gradient, the
encoded contribution, the mean, the seconds it measured) and never waits on it. The observer
keeps the costs of reporting off the path (docs/design.md §7):
- Norms and dot products are accumulated in float64 a chunk at a time: float64 copies of a
  whole shard would cost several times its fp32 size in transient memory at every sync
  (benchmarks/bench_memory.py, 48.5 MB shard: peak RSS over DP fell from +306 MB to +100 MB).
- Each rank holds 1/D of a fragment, so the per-shard sums are added up over the replica's D
  ranks to describe the whole fragment. That sum is an asynchronous collective, launched at
  the finish of a sync and read at the next finish (or at `flush()`), so no sync blocks on it.
- The cosine of this replica's contribution to the mean needs that contribution at the
  finish. Compressed exchanges hold it anyway (error feedback's decoded payload stands in for
  decoding this rank's own payload again). The uncompressed exchange all-reduces the
  pseudo-gradient in place and keeps no copy, so it reports no cosine: a copy of the
  fragment shard held through the overlap is not paid for a metric.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .metrics import MetricsLogger

CHUNK = 1 << 20  # elements per float64 accumulation chunk

# Per-sync sums, added up over the replica's D shards: launch-time then finish-time entries.
_DELTA_SQ, _ERR_SQ, _RESID_SQ, _MEAN_SQ, _OWN_SQ, _OWN_DOT_MEAN, _HAS_OWN = range(7)


def _pieces(pieces: Sequence[torch.Tensor], numel: int) -> list[tuple[int, torch.Tensor]]:
    """(offset, piece) for pieces laid end to end, clipped at `numel` elements."""
    out, off = [], 0
    for p in pieces:
        p = p.reshape(-1)[: max(0, numel - off)]
        if p.numel():
            out.append((off, p))
        off += p.numel()
    return out


def sums(x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor, *, diff: bool = False,
         chunk: int = CHUNK) -> torch.Tensor:
    """float64 [Σx², Σy², Σx·y] (or with `diff`, [Σ(x−y)², 0, 0]) for flat y and x given whole or
    as pieces laid end to end over y, accumulated a chunk at a time."""
    y = y.reshape(-1)
    pieces = _pieces([x] if isinstance(x, torch.Tensor) else x, y.numel())
    out = torch.zeros(3, dtype=torch.float64, device=y.device)
    for off, piece in pieces:
        for i in range(0, piece.numel(), chunk):
            a = piece[i:i + chunk].double()
            b = y[off + i: off + i + a.numel()].double()
            if diff:
                d = a.sub_(b)
                out[0] += d.dot(d)
            else:
                out += torch.stack([a.dot(a), b.dot(b), a.dot(b)])
    return out


def sq_norm(tensors: Sequence[torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    """float64 Σ over tensors of Σx², a chunk at a time (0-d tensor)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        t = t.reshape(-1)
        total = total.to(t.device)
        for i in range(0, t.numel(), chunk):
            a = t[i:i + chunk].double()
            total += a.dot(a)
    return total


class _Pending:
    """One finished sync whose replica-wide sums may still be in flight."""

    def __init__(self, step: int, fragment_id: int, handle: Any, scalars: dict[str, float]) -> None:
        self.step, self.fragment_id, self.handle, self.scalars = step, fragment_id, handle, scalars


class SyncObserver:
    """Receives each sync's results from `OuterSync` and turns them into metrics and totals.

    Args:
        metrics: where scalars go (a no-op logger on ranks that do not log).
        replica_sum: launches an asynchronous sum of a small tensor over the replica's D ranks
            and returns a handle whose `wait()` gives the sum; None when D = 1.
    """

    def __init__(self, metrics: MetricsLogger, replica_sum: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.metrics = metrics
        self.replica_sum = replica_sum
        self.launch_s = 0.0  # pseudo-gradient + compression + launch: on the training path
        self.exposed_s = 0.0  # blocked in wait(): what overlap failed to hide
        self.hidden_s = 0.0  # wall time between launch and wait, during which compute ran
        self.compress_s = 0.0  # error feedback + compression, inline or in the background
        self.compress_exposed_s = 0.0  # of which the training path waited for
        self.apply_s = 0.0  # outer step and write-back into the shard
        self.refresh_s = 0.0  # DeepSpeed's refresh of the module's params from the fp32 shard
        self.syncs = 0
        self._launch: dict[int, tuple[torch.Tensor, float, float]] = {}  # p -> (sums, payload bytes, t)
        self._pending: list[_Pending] = []
        self._compress_s: dict[int, tuple[float, float]] = {}

    # -- called by the data path ----------------------------------------------------------
    def encoded(self, fragment_id: int, delta: torch.Tensor, own: Sequence[torch.Tensor] | None,
                residuals: Sequence[torch.Tensor], payload_bytes: int, compress_s: float = 0.0,
                exposed_compress_s: float = 0.0) -> None:
        """Before the launch: |Δ|², what compression changed, what error feedback holds, and how
        long compression took and how much of that the training path waited for."""
        self.compress_s += compress_s
        self.compress_exposed_s += exposed_compress_s
        self._compress_s[fragment_id] = (compress_s, exposed_compress_s)
        launch = torch.zeros(3, dtype=torch.float64, device=delta.device)
        launch[_DELTA_SQ] = sq_norm([delta])
        if own is not None:
            launch[_ERR_SQ] = sums(own, delta, diff=True)[0]
        launch[_RESID_SQ] = sq_norm(residuals).to(delta.device)
        self._launch[fragment_id] = (launch, float(payload_bytes), 0.0)

    def launched(self, fragment_id: int, seconds: float) -> None:
        self.launch_s += seconds
        launch, nbytes, _ = self._launch.get(fragment_id, (None, 0.0, 0.0))
        self._launch[fragment_id] = (launch, nbytes, time.perf_counter())

    def refreshed(self, seconds: float) -> None:
        self.refresh_s += seconds

    def nonfinite_skipped(self, step: int) -> None:
        self.metrics.scalar("outer/nonfinite_skipped", 1.0, step)

    def finished(self, fragment_id: int, step: int, mean: torch.Tensor, own: Sequence[torch.Tensor] | None,
                 *, wait_started: float, waited_s: float, sync_s: float, outer_steps: int,
                 bytes_sent: int, apply_s: float = 0.0) -> None:
        """After the write-back: log earlier syncs whose sums have arrived, launch this one's.

        `wait_started` is the `time.perf_counter()` at which the path began to wait.
        """
        launch, nbytes, launched_at = self._launch.pop(fragment_id, (None, 0.0, 0.0))
        hidden = wait_started - launched_at if launched_at else 0.0  # 0 after a resume
        self.exposed_s += waited_s
        self.hidden_s += hidden
        self.apply_s += apply_s
        self.syncs += 1
        stats = torch.zeros(7, dtype=torch.float64, device=mean.device)
        if launch is not None:
            stats[:3] = launch
        if own is not None:
            stats[_MEAN_SQ:_HAS_OWN] = sums(own, mean)[[1, 0, 2]]
            stats[_HAS_OWN] = 1.0
        else:
            stats[_MEAN_SQ] = sums(mean, mean)[0]
        self.flush(wait=False)
        compress_s, compress_exposed_s = self._compress_s.pop(fragment_id, (0.0, 0.0))
        handle = self.replica_sum(stats) if self.replica_sum is not None else None
        self._pending.append(_Pending(step, fragment_id, handle if handle is not None else stats, {
            "outer/steps": outer_steps, "outer/sync_seconds": sync_s, "comm/exposed_seconds": waited_s,
            "comm/in_flight_compute_seconds": hidden, "comm/bytes_sent_total": bytes_sent,
            "comm/payload_bytes": nbytes, "outer/compress_seconds": compress_s,
            "outer/compress_exposed_seconds": compress_exposed_s,
            "outer/apply_seconds": apply_s}))

    # -- reporting -------------------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """Log every finished sync whose sums are in (all of them with `wait`, in order)."""
        while self._pending:
            item = self._pending[0]
            h = item.handle
            if isinstance(h, torch.Tensor):
                stats = h
            elif wait or h.test():
                stats = h.wait()
            else:
                return
            self._pending.pop(0)
            self._log(item, stats.tolist())

    def _log(self, item: _Pending, s: list[float]) -> None:
        m, step, p = self.metrics, item.step, item.fragment_id
        m.scalars(item.scalars, step)
        m.scalar(f"outer/pseudo_grad_norm/fragment{p}", math.sqrt(s[_MEAN_SQ]), step)
        if s[_HAS_OWN] > 0:  # summed over D shards: every shard holds it or none does
            denom = math.sqrt(s[_MEAN_SQ] * s[_OWN_SQ])
            m.scalar(f"outer/replica_cosine_to_mean/fragment{p}", s[_OWN_DOT_MEAN] / denom if denom > 0 else 0.0,
                     step)
            m.scalar("compress/relative_error", math.sqrt(s[_ERR_SQ] / s[_DELTA_SQ]) if s[_DELTA_SQ] > 0 else 0.0,
                     step)
            m.scalar("compress/ef_residual_norm", math.sqrt(s[_RESID_SQ]), step)

    def summary(self) -> dict[str, float]:
        """Totals for result.json (flushes the metrics still in flight)."""
        self.flush()
        return {"comm_exposed_s": self.exposed_s, "comm_hidden_s": self.hidden_s, "comm_launch_s": self.launch_s,
                "compress_s": self.compress_s, "compress_exposed_s": self.compress_exposed_s,
                "apply_s": self.apply_s, "refresh_s": self.refresh_s, "syncs_finished": self.syncs}
