"""Views into this rank's DeepSpeed ZeRO-1/2 fp32 master partition, per fragment.

ZeRO keeps the fp32 master weights flat and partitioned across the D ranks of a replica;
those partitions are the truth that the inner optimizer steps. The outer loop therefore reads
and writes them directly (shard-wise), then asks DeepSpeed to refresh the module parameters,
so DeepSpeed's own copies never disagree with ours.
"""
from __future__ import annotations

from typing import Any

import torch


class ZeroShard:
    """Gather/scatter the part of each fragment that this rank's ZeRO partition owns.

    Ranks with the same shard index in different replicas own identical layouts (same model,
    same D), so their gathered vectors line up element for element across the outer group.
    The views are looked up from each parameter's `_hp_mapping` at every call, never cached:
    DeepSpeed re-links them when it loads a checkpoint, and a cached view would then point
    at memory the optimizer no longer steps.
    """

    def __init__(self, ds_optimizer: Any, named_params: list[tuple[str, torch.nn.Parameter]],
                 fragments: list[list[str]]) -> None:
        if not hasattr(ds_optimizer, "single_partition_of_fp32_groups"):
            raise ValueError(f"the outer loop needs DeepSpeed ZeRO stage 1 or 2 (got optimizer "
                             f"{type(ds_optimizer).__name__})")
        self.optimizer = ds_optimizer
        by_name = dict(named_params)
        self.params = [[by_name[n] for n in names] for names in fragments]
        self.device = ds_optimizer.single_partition_of_fp32_groups[0].device

    def views(self, fragment_id: int) -> list[torch.Tensor]:
        """Flat fp32 views of this rank's elements of the fragment, in parameter order."""
        out = []
        for param in self.params[fragment_id]:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None:  # None: this rank's partition holds no element of it
                out.append(mapping.get_hp_fragment().view(-1))
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
        """Copy fp32 masters into the module's (low-precision) params; collective in the replica."""
        self.optimizer.update_lp_params()
