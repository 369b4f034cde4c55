"""Views into this rank's DeepSpeed ZeRO fp32 master partition (stage 1, 2 or 3), per fragment.

ZeRO keeps the fp32 master weights flat and partitioned across the D ranks of a replica;
those partitions are the truth that the inner optimizer steps. The outer loop therefore reads
and writes them directly (shard-wise), then asks DeepSpeed to refresh the module parameters,
so DeepSpeed's own copies never disagree with ours.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .param_roles import layer_shape
from .segments import ParamExtent, kind_for


class ZeroShard:
    """Gather/scatter the part of each fragment that this rank's ZeRO partition owns.

    Ranks with the same shard index in different replicas own identical layouts (same model,
    same D), so their gathered vectors line up element for element across the outer group.
    The views are looked up from each parameter's `_hp_mapping` at every call, never cached:
    DeepSpeed re-links them when it loads a checkpoint, and a cached view would then point
    at memory the optimizer no longer steps.
    """

    def __init__(self, ds_optimizer: Any, named_params: list[tuple[str, torch.nn.Parameter]],
                 fragments: list[list[str]], kinds: dict[str, str] | None = None) -> None:
        self.stage3 = hasattr(ds_optimizer, "fp32_partitioned_groups_flat")
        if not (self.stage3 or hasattr(ds_optimizer, "single_partition_of_fp32_groups")):
            raise ValueError(f"the outer loop needs DeepSpeed ZeRO stage 1, 2 or 3 (got optimizer "
                             f"{type(ds_optimizer).__name__})")
        self.optimizer = ds_optimizer
        by_name = dict(named_params)
        self.params = [[by_name[n] for n in names] for names in fragments]
        self.names = [list(names) for names in fragments]
        self.kinds = kinds or {}
        flats = ds_optimizer.fp32_partitioned_groups_flat if self.stage3 else ds_optimizer.single_partition_of_fp32_groups
        self.device = flats[0].device

    def views(self, fragment_id: int) -> list[torch.Tensor]:
        """Flat fp32 views of this rank's elements of the fragment, in parameter order.

        ZeRO-1/2: each parameter's `_hp_mapping` (None where this rank's partition holds none of
        it). ZeRO-3: every parameter has a partition on every rank (ceil(numel/D) elements, the
        last rank's padded with zeros that stay zero), at `grad_position` = (sub-group, offset,
        numel) in that sub-group's flat fp32 partition.
        """
        out = []
        opt = self.optimizer
        for param in self.params[fragment_id]:
            if self.stage3:
                group, offset, numel = opt.grad_position[opt.get_param_id(param)]
                out.append(opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel))
                continue
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:  # None: this rank's partition holds no element of it
                out.append(mapping.get_hp_fragment().view(-1))
        return out

    def extents(self, fragment_id: int) -> list[ParamExtent]:
        """Which elements of which parameter `views(fragment_id)` holds, in the same order (for
        parameter-aware compression, segments.py)."""
        out = []
        opt = self.optimizer
        # ZeRO-3 partitions are rank-ordered and equal-sized
        rank = dist.get_rank(group=opt.dp_process_group) if self.stage3 else 0
        for name, param in zip(self.names[fragment_id], self.params[fragment_id]):
            shape = layer_shape(param)
            kind = kind_for(self.kinds, name, shape)
            if self.stage3:
                _, _, numel = opt.grad_position[opt.get_param_id(param)]
                out.append(ParamExtent(name, kind, shape, rank * numel, numel))
                continue
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:
                addr = mapping.lp_fragment_address
                out.append(ParamExtent(name, kind, shape, addr.start, addr.numel))
        return out

    @property
    def numels(self) -> list[int]:
        return [sum(v.numel() for v in self.views(p)) for p in range(len(self.params))]

    @torch.no_grad()
    def gather(self, fragment_id: int) -> torch.Tensor:
        """A fresh flat fp32 copy of this rank's slice of the fragment."""
        views = self.views(fragment_id)
        if not views:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        return torch.cat(views)

    @torch.no_grad()
    def scatter(self, fragment_id: int, flat: torch.Tensor) -> None:
        """Write a flat vector back into the fp32 master partition (no module refresh yet)."""
        offset = 0
        for v in self.views(fragment_id):
            v.copy_(flat[offset: offset + v.numel()])
            offset += v.numel()

    def refresh_module_params(self) -> None:
        """Copy fp32 masters into the module's (low-precision) params; collective in the replica.

        ZeRO-3 has no `update_lp_params`; this does what its `step()` does around the optimizer:
        release the gathered parameters, copy each sub-group's fp32 partition into its
        low-precision partition, drop secondary copies, and all-gather the persistent (small,
        kept whole) parameters again, now from the new partitions.
        """
        opt = self.optimizer
        if not self.stage3:
            opt.update_lp_params()
            return
        opt._partition_all_parameters()
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)
        opt.invalidate_secondary_tensor()
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
