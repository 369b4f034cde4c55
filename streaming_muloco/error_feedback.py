"""Error feedback: what compression dropped this round is sent in a later one (docs/design.md §1).

Per replica and per fragment shard, with residual e (fp32, on the delta's device):

    1. e ← β·e + s·Δ       # β = 1: classic EF; the MuLoCo code decays with β = 0.9
    2. q = C(e)            # the payload that goes on the wire
    3. e ← e − D(q)        # keep exactly what the receivers will NOT see

With β = 1 this keeps the invariant  Σ D(q_t) + e_T = s·Σ Δ_t : nothing is lost, only delayed,
which is why 2-bit pseudo-gradients train almost as well as fp32 ones (MuLoCo, arXiv 2505.23725).

`s` (`scale`) is there because the official MuLoCo code feeds η·Δ (η the outer lr) into the
buffer; since the outer SGD multiplies by η again, its effective outer lr is η². Our default
s = 1 feeds Δ itself.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .compression import Compressor, Payload
from .outer_state import OuterStateStore


class ErrorFeedback:
    """The EF residual of one tensor (one fragment shard); `step` compresses with feedback.

    Args:
        beta: decay of the residual in (0, 1]; 1.0 is classic error feedback.
        enabled: False gives plain compression of s·Δ and keeps no residual.
        scale: s, multiplies Δ before it enters the buffer (MuLoCo code: the outer lr).
        numel: allocate the residual now (else at the first step, on the delta's device).
        device: where to allocate it when `numel` is given.
    """

    def __init__(self, beta: float = 1.0, enabled: bool = True, scale: float = 1.0,
                 numel: int | None = None, device: torch.device | str | None = None,
                 store: OuterStateStore | None = None) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 < beta <= 1.0):
            raise ValueError(f"error feedback beta ({beta}) must be in (0, 1]; 1.0 is classic error feedback")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0.0):
            raise ValueError(f"error feedback scale ({scale}) must be a finite non-zero number "
                             f"(1.0, or the outer lr to follow the MuLoCo code)")
        self.beta, self.enabled, self.scale = float(beta), bool(enabled), float(scale)
        self.store = store  # where the residual rests between steps (outer_state.py); None: in place
        self.residual: torch.Tensor | None = None
        self.working: torch.Tensor | None = None  # the last step's residual where it was computed
        if numel is not None and self.enabled:
            self.residual = torch.zeros(numel, dtype=torch.float32, device=device)

    def step(self, delta: torch.Tensor, compressor: Compressor) -> tuple[Payload, torch.Tensor]:
        """Compress Δ with feedback; returns (payload to send, its decompressed fp32 value).

        The decompressed value is what every receiver decodes from the payload, so the caller
        can use it for its own share of the average without decoding again. Check Δ with
        `compression.has_nonfinite` first: a NaN that enters the residual never leaves it.
        """
        if delta.dim() != 1:
            raise ValueError(f"error feedback expects a flat 1-D delta, got shape {tuple(delta.shape)}; "
                             f"pass delta.reshape(-1)")
        if not self.enabled:
            x = delta if self.scale == 1.0 else delta * self.scale
            payload = compressor.compress(x)
            return payload, compressor.decompress(payload)
        if self.residual is None:
            zeros = torch.zeros(delta.numel(), dtype=torch.float32, device=delta.device)
            self.residual = zeros if self.store is None else self.store.rest(zeros)
        elif self.residual.numel() != delta.numel():
            raise ValueError(f"error feedback residual has {self.residual.numel()} elements but delta has "
                             f"{delta.numel()}; use one ErrorFeedback per fragment shard")
        e = self.residual if self.store is None else self.store.fetch(self.residual)
        if self.beta != 1.0:
            e.mul_(self.beta)
        e.add_(delta.to(device=e.device), alpha=self.scale)
        payload = compressor.compress(e)
        sent = compressor.decompress(payload)
        e.sub_(sent)
        self.working = e  # for metrics; the exchange takes it (and drops the reference) at once
        if self.store is not None:
            self.store.put_back(self.residual, e)
        return payload, sent

    def reset(self) -> None:
        """Forget the residual (for example after a non-finite delta was skipped)."""
        if self.residual is not None:
            self.residual.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "enabled": self.enabled, "scale": self.scale,
                "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; the residual goes to the device of the current one, if any."""
        expected = {"beta", "enabled", "scale", "residual"}
        if set(state) != expected:
            raise ValueError(f"error feedback state has keys {sorted(state)}, expected {sorted(expected)}")
        if (state["beta"], state["enabled"], state["scale"]) != (self.beta, self.enabled, self.scale):
            raise ValueError(f"checkpoint error feedback (beta={state['beta']}, enabled={state['enabled']}, "
                             f"scale={state['scale']}) differs from this run's (beta={self.beta}, "
                             f"enabled={self.enabled}, scale={self.scale}); resume with the same compression config")
        r = state["residual"]
        if r is None:
            self.residual = None
            return
        if self.store is not None and self.store.on_host:
            self.residual = self.store.rest(r.detach().to(dtype=torch.float32))
            return
        device = self.residual.device if self.residual is not None else r.device
        self.residual = r.detach().to(device=device, dtype=torch.float32, copy=True)
