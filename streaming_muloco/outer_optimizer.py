"""The outer step of DiLoCo: Nesterov SGD on the global params, driven by the pseudo-gradient.

Everything here is pure tensor math on one flat fp32 shard of one fragment (docs/design.md §4):
no process groups, no parameters, no modules. The distributed glue (`outer_sync.py`) calls, per
fragment and per rank:

    delta = pseudo_grad(theta_g, local)        # then compressed and averaged over replicas
    opt.step(theta_g, mean_delta)              # theta_g <- OuterOpt(theta_g, mean_delta)
    local = mix(local_now, theta_g, mix_alpha) # alpha = 0: restart from the global params

With eager updates the outer step is taken at the sync point, on `eager_outer_grad`, and the
average only updates `others` when it arrives (`eager_pending`, `eager_arrived`).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def pseudo_grad(theta_g: torch.Tensor, theta_local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Δ = θ_g − θ_local (into `out` when given; it may be `theta_local` itself).

    The sign makes Δ behave like a gradient: the SGD step θ_g − lr·Δ moves the global params
    TOWARDS the replica's params, and lr = 1, μ = 0 lands exactly on them.
    """
    if theta_g.shape != theta_local.shape:
        raise ValueError(f"pseudo_grad: theta_g {tuple(theta_g.shape)} and theta_local "
                         f"{tuple(theta_local.shape)} must have the same shape (same fragment shard)")
    return torch.sub(theta_g, theta_local, out=out) if out is not None else theta_g - theta_local


def mix(theta_local_now: torch.Tensor, theta_outer: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·θ_local(now) + (1−α)·θ_outer: how much of the τ overlap steps' local progress to keep.

    α = 0 restarts the replica from the outer result (DiLoCo); α = 1 leaves it untouched.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix_alpha ({alpha}) must be in [0, 1]")
    if alpha == 0.0:
        return theta_outer.clone()
    if alpha == 1.0:
        return theta_local_now.to(theta_outer.dtype, copy=True)
    return torch.lerp(theta_outer, theta_local_now.to(theta_outer.dtype), alpha)


def eager_outer_grad(others: torch.Tensor, delta: torch.Tensor, share: float) -> torch.Tensor:
    """The eager outer gradient (Kale et al., arXiv 2502.12996; docs/design.md §3):
    g̃ = others + share·Δ, a new tensor.

    `others` is the fragment's previous average with this replica's own share of it taken out
    (see `eager_pending` and `eager_arrived`), and share = s/K: this replica's fresh Δ stands in
    for its share of an average whose other K−1 parts are one round late. For the first round
    `others` is zero.
    """
    return torch.add(others, delta.to(others.dtype), alpha=share)


def eager_pending(others: torch.Tensor, delta: torch.Tensor, share: float) -> None:
    """others ← −share·Δ in place, right after the eager step has used it.

    When the round's average arrives, `eager_arrived` adds it, leaving mean − share·Δ: the
    term this replica applied eagerly is taken back out exactly, so over rounds each replica
    applies every complete average once plus only its LATEST fresh term, and replicas differ
    by that term alone (with μ = 0: θ_g = consensus − lr·share·Δ_latest).
    """
    torch.mul(delta.to(others.dtype), -share, out=others)


def eager_arrived(others: torch.Tensor, mean: torch.Tensor) -> None:
    """others ← others + mean in place, when the round's average pseudo-gradient arrives."""
    others.add_(mean.to(others.dtype))


class OuterNesterovSGD:
    """torch.optim.SGD(momentum=μ, nesterov=...) for one flat tensor passed at each step.

    Written by hand rather than wrapping torch.optim.SGD so that θ_g can be any tensor (a
    shard, a view) and the state is one buffer; the test suite checks it equals torch's SGD.

    Args:
        lr: outer learning rate η (DiLoCo default 0.7).
        momentum: μ in [0, 1) (default 0.9). μ = 0 is plain SGD and keeps no buffer.
        nesterov: look ahead along the momentum (default True).
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer_lr ({lr}) must be a finite number > 0; DiLoCo uses 0.7")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"outer_momentum ({momentum}) must be in [0, 1); DiLoCo uses 0.9")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.momentum_buffer: torch.Tensor | None = None
        self.steps = 0

    @torch.no_grad()
    def step(self, theta_g: torch.Tensor, pseudo_grad: torch.Tensor) -> None:
        """Update `theta_g` in place, with the same arithmetic as torch.optim.SGD.

        1. buf ← Δ on the first step, else buf ← μ·buf + Δ (no dampening).
        2. d ← Δ + μ·buf with Nesterov, else d ← buf.
        3. θ_g ← θ_g − lr·d.
        """
        if theta_g.shape != pseudo_grad.shape:
            raise ValueError(f"OuterNesterovSGD.step: theta_g {tuple(theta_g.shape)} and pseudo_grad "
                             f"{tuple(pseudo_grad.shape)} must have the same shape")
        d = pseudo_grad.to(theta_g.dtype)
        if self.momentum != 0.0:
            buf = self.momentum_buffer
            if buf is None:
                buf = self.momentum_buffer = torch.clone(d).detach()
            else:
                if buf.shape != d.shape:
                    raise ValueError(f"OuterNesterovSGD.step: pseudo_grad {tuple(d.shape)} does not match the "
                                     f"momentum buffer {tuple(buf.shape)}: one optimizer per fragment shard")
                buf.mul_(self.momentum).add_(d)
            d = d.add(buf, alpha=self.momentum) if self.nesterov else buf
        theta_g.add_(d, alpha=-self.lr)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffer and step count; hyperparameters are listed for reference only."""
        buf = self.momentum_buffer
        return {"momentum_buffer": None if buf is None else buf.clone(), "steps": self.steps,
                "lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the buffer and step count.

        lr, momentum and nesterov stay as constructed: the config of the resumed run decides them.
        """
        buf = state["momentum_buffer"]
        self.momentum_buffer = None if buf is None else buf.detach().clone()
        self.steps = int(state["steps"])
