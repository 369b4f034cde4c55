"""What DeepSpeed builds from a config's optimizer, scheduler and clipping keys, for one replica
in one process: the simulator's inner loop (tests/test_simulator.py pins it to DeepSpeed).

- "Adam"/"AdamW": torch's AdamW (the configs set "torch_adam": true; without it DeepSpeed uses
  a fused kernel with the same math);
- "Muon": DeepSpeed's own `MuonWithAuxAdam` (its `muon_update`, its param groups, torch AdamW
  for the auxiliary parameters), with the split by module that `streaming_muloco.initialize`
  hands DeepSpeed (param_roles.py);
- DeepSpeed ZeRO's gradient clipping rule and DeepSpeed's (or torch's) LR scheduler classes.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import param_roles
from ..errors import ConfigError
from ..model import GPT


class InnerOptimizer:
    """The optimizer, scheduler and clipping DeepSpeed would build from the same JSON."""

    def __init__(self, model: GPT, ds_config: dict, adamw_params: tuple[str, ...] = ()) -> None:
        from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))
        self.optimizer = _build_optimizer(model, ds_config.get("optimizer") or {}, adamw_params)
        self.scheduler = _build_scheduler(self.optimizer, ds_config.get("scheduler"))

    def step(self) -> None:
        if self.clip > 0:
            self._clip()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()  # DeepSpeed steps its scheduler after every applied optimizer step
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _clip(self) -> None:
        """DeepSpeed ZeRO's rule: divide by max(1, (norm + 1e-6) / clip)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        scale = torch.clamp((norm + 1e-6) / self.clip, min=1.0)
        for g in grads:
            g.mul_(1.0 / scale)


def _build_optimizer(model: GPT, opt: dict, adamw_params: tuple[str, ...]) -> torch.optim.Optimizer:
    """DeepSpeed's `_configure_basic_optimizer` for the optimizer types the simulator supports.

    Without "torch_adam": true DeepSpeed would use a fused Adam kernel with the same math; the
    simulator uses torch's either way.
    """
    kind = str(opt.get("type", "")).lower()
    params = dict(opt.get("params") or {})
    params.pop("torch_adam", None)
    params.pop("fp32_optimizer_states", None)
    foreach = params.pop("foreach", None)
    if kind in ("adam", "adamw"):
        adam_w_mode = kind == "adamw" or params.pop("adam_w_mode", True)
        params.pop("adam_w_mode", None)
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
        return cls(model.parameters(), foreach=foreach, **params)
    if kind == "muon":
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        if params.get("per_head_muon"):
            raise ConfigError("optimizer.params.per_head_muon is not supported by the simulator; remove it")
        adam_w_mode = params.pop("adam_w_mode", True)
        param_roles.tag(model, param_roles.split_roles(model, adamw_params))
        groups = DeepSpeedEngine._muon_param_groups(list(model.parameters()), params)
        return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW if adam_w_mode else torch.optim.Adam,
                               adam_optimizer_kwargs={"foreach": foreach}, adam_w_mode=adam_w_mode)
    raise ConfigError(f"optimizer.type '{opt.get('type')}' is not supported by the simulator; use Adam, AdamW "
                      f"or Muon")


def _build_scheduler(optimizer: torch.optim.Optimizer, sched: dict | None) -> Any:
    """DeepSpeed's `_scheduler_from_config`: its own schedules first, then torch's."""
    if not sched:
        return None
    from deepspeed.runtime import lr_schedules

    name = sched.get("type")
    cls = getattr(lr_schedules, name, None) or getattr(torch.optim.lr_scheduler, name, None)
    if cls is None:
        raise ConfigError(f"scheduler.type '{name}' is neither a DeepSpeed nor a torch LR scheduler")
    return cls(optimizer, **(sched.get("params") or {}))
