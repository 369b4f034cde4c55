"""The inner optimizer: DeepSpeed's built-in Muon (with its auxiliary AdamW), checked and patched.

DeepSpeed >= 0.19 orthogonalises Muon updates inside ZeRO-1/2 (`get_flat_partition`), so we
use it rather than our own optimizer, which would only ever see flat 1-D shards. Two gaps are
closed here instead of forking DeepSpeed:
- its update scale is fixed to sqrt(max(1, rows/cols)); MuLoCo's recipe (after Moonlight)
  uses 0.2*sqrt(max(rows, cols)), which matches AdamW's update RMS so one learning rate and
  weight decay serve both halves. `install_update_scale("moonlight")` swaps the scale;
- DeepSpeed tags parameters for Muon by name; `muon_param_names` reports what it chose so
  callers and tests can check it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

_ORIGINAL_SCALE: Callable[[int, int], float] | None = None


def moonlight_scale(rows: int, cols: int) -> float:
    """0.2*sqrt(max(A, B)): an orthogonal update's RMS is ~1/sqrt(max(A, B)), so this gives ~0.2."""
    return 0.2 * math.sqrt(max(rows, cols))


def install_update_scale(kind: str) -> None:
    """Choose Muon's per-matrix update scale for this process ("deepspeed" or "moonlight").

    DeepSpeed's `muon_update` looks `_aspect_ratio_scale` up as a module global at call time,
    so replacing that global changes the scale on every ZeRO path without copying its code.
    """
    global _ORIGINAL_SCALE
    from deepspeed.runtime.zero.muon import original_muon

    if _ORIGINAL_SCALE is None:
        _ORIGINAL_SCALE = original_muon._aspect_ratio_scale
    if kind == "moonlight":
        original_muon._aspect_ratio_scale = moonlight_scale
    elif kind == "deepspeed":
        original_muon._aspect_ratio_scale = _ORIGINAL_SCALE
    else:
        raise ValueError(f"streaming_muloco.inner.muon_update_scale '{kind}' is unknown; use 'deepspeed' or "
                         f"'moonlight'")


def uses_muon(ds_config: dict) -> bool:
    opt = ds_config.get("optimizer") or {}
    return str(opt.get("type", "")).lower() == "muon"


def muon_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters DeepSpeed tagged for Muon (after deepspeed.initialize)."""
    return [n for n, p in model.named_parameters() if getattr(p, "use_muon", False)]
