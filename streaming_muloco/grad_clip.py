"""Gradient clipping that composes with Muon inside DeepSpeed ZeRO (docs/design.md §2).

What users mean by `gradient_clipping: c` is: scale the replica's raw gradient by
min(1, c / ||g||), with the norm over the whole replica (all ZeRO partitions), before the
optimizer sees it. DeepSpeed ZeRO-1/2 runs Muon's momentum and Newton–Schulz while it
assembles each rank's gradient partition (`get_flat_partition`, in the epilogue of the
backward pass that ends an accumulation window) and clips later, in `step()`, by the norm of
what it assembled: the orthogonalised update, whose norm is about sqrt(min(rows, cols)) per
matrix whatever the gradient was (upstream issues #7776 and #8439).

So DeepSpeed gets `gradient_clipping: 0` and the clipping happens here, at the one point
where the replica's reduced raw gradient is complete and Muon has not seen it yet: the first
`get_all_grad_tensors` call of that epilogue, after all reductions and their stream sync.
Two instance attributes of the ZeRO optimizer are wrapped; DeepSpeed's code is not copied.
ZeRO-3 runs Muon later, inside `step()` (`_apply_muon_to_accumulated_grads`, on each rank's
reduced gradient partitions, after the overflow check); there the clip runs just before it.

The rule is DeepSpeed's own (`unscale_and_clip_grads`): with n the norm of the unscaled
gradient, multiply by 1 / ((n + 1e-6) / c) when that factor exceeds 1. A non-finite norm is
left alone, so fp16's overflow check still sees the overflow and skips the step.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class MuonGradClipper:
    """Clips the raw gradient of one ZeRO optimizer (stage 1, 2 or 3) before Muon runs on it.

    `last_norm`: the replica's unscaled raw gradient norm at the last accumulation boundary
    (a 0-d tensor; None before the first). `clipped_steps`: how many boundaries were clipped.
    """

    def __init__(self, zero_optimizer: Any, clip: float) -> None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.opt = zero_optimizer
        self.clip = float(clip)
        self.last_norm: torch.Tensor | None = None
        self.clipped_steps = 0
        self._armed = False
        self.stage3 = hasattr(zero_optimizer, "_apply_muon_to_accumulated_grads")
        if self.stage3:
            # ZeRO-3 runs Muon in step(), once per accumulation window, on the reduced partitions
            # (`averaged_gradients`) after its overflow check: clip right before that.
            apply_muon = zero_optimizer._apply_muon_to_accumulated_grads

            def _apply_muon_to_accumulated_grads() -> Any:
                self.clip_now()
                return apply_muon()

            zero_optimizer._apply_muon_to_accumulated_grads = _apply_muon_to_accumulated_grads
            return
        for name in ("independent_gradient_partition_epilogue", "get_all_grad_tensors", "params_in_partition",
                     "all_grad_tensors", "get_param_gradient_attribute", "dp_process_group"):
            if not hasattr(zero_optimizer, name):
                raise ValueError(f"gradient clipping with Muon needs DeepSpeed's ZeRO stage 1, 2 or 3 optimizer; "
                                 f"{type(zero_optimizer).__name__} has no '{name}'")
        epilogue, get_all = zero_optimizer.independent_gradient_partition_epilogue, zero_optimizer.get_all_grad_tensors

        def independent_gradient_partition_epilogue() -> Any:
            self._armed = bool(zero_optimizer.is_gradient_accumulation_boundary())
            try:
                return epilogue()
            finally:
                self._armed = False

        def get_all_grad_tensors(tensor_list: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
            if self._armed:
                self._armed = False
                self.clip_now()
            return get_all(tensor_list, dtype)

        zero_optimizer.independent_gradient_partition_epilogue = independent_gradient_partition_epilogue
        zero_optimizer.get_all_grad_tensors = get_all_grad_tensors

    def _gradient_pieces(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(this rank's owned slices, for the norm; the whole tensors holding them, to scale).

        Per group: ZeRO's compact fp32 partition where it keeps one (non-Muon groups under
        bf16/fp16 with fp32 accumulation), else each partition parameter's gradient tensor plus
        what earlier micro-steps accumulated (`all_grad_tensors`), sliced to the elements this
        rank owns (`_hp_mapping`), so that every element counts once across the replica.
        """
        opt = self.opt
        if self.stage3:  # each rank's own partitions of every parameter (padding is zero)
            parts = [g for grads in opt.averaged_gradients.values() if grads for g in grads if g is not None]
            return parts, parts
        owned: list[torch.Tensor] = []
        whole: dict[int, torch.Tensor] = {}
        compact = getattr(opt, "_use_compact_grad_partition_buffer", lambda i: False)
        for i, params in enumerate(opt.params_in_partition):
            if compact(i):
                flat = getattr(opt.averaged_gradients.get(i), "flat_partition", None)
                if flat is not None:
                    owned.append(flat)
                    whole[flat.data_ptr()] = flat
                continue
            accumulated = opt.all_grad_tensors.get(i) if isinstance(opt.all_grad_tensors, dict) else None
            for k, p in enumerate(params):
                terms = [t for t in ((accumulated[k] if accumulated else None), opt.get_param_gradient_attribute(p))
                         if t is not None]
                terms = list({t.data_ptr(): t for t in terms}.values())  # the same tensor only once
                if not terms:
                    continue
                for t in terms:
                    whole[t.data_ptr()] = t
                address = p._hp_mapping.lp_fragment_address
                grad = terms[0] if len(terms) == 1 else terms[0] + terms[1]
                owned.append(grad.reshape(-1).narrow(0, address.start, address.numel))
        return owned, list(whole.values())

    @torch.no_grad()
    def clip_now(self) -> None:
        """Compute the replica's raw gradient norm (one all-reduce of a scalar) and clip."""
        owned, whole = self._gradient_pieces()
        device = owned[0].device if owned else torch.device(_device_name())
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for g in owned:
            sq += g.float().pow(2).sum()
        dist.all_reduce(sq, group=self.opt.dp_process_group)
        loss_scale = float(getattr(self.opt, "loss_scale", 1.0) or 1.0)
        norm = sq.sqrt() / loss_scale
        self.last_norm = norm
        factor = (norm + 1e-6) / self.clip
        f = float(factor)  # the step's one host sync; non-finite exactly when the norm is
        if not math.isfinite(f) or f <= 1.0:
            return
        self.clipped_steps += 1
        scale = 1.0 / factor
        for t in whole:
            t.mul_(scale.to(t.dtype))


def _device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()
