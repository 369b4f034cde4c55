"""`streaming_muloco.initialize`: `deepspeed.initialize` plus the outer loop.

A DeepSpeed script changes by one import and one config section:

    engine, optimizer, _, scheduler = streaming_muloco.initialize(model=model, config="ds.json")
    for step in ...:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()          # inner step; outer syncs run on schedule inside it
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

log = logging.getLogger("streaming_muloco")

from .config import ConfigError, StreamingMuLoCoConfig, read_json, resolve, world_size_from_env
from .inner import install_update_scale, muon_param_names, uses_muon
from .metrics import MetricsLogger
from .topology import Topology


def launched_world_size() -> int:
    """The world size the launcher announced, read before any process group exists."""
    if dist.is_initialized():
        return dist.get_world_size()
    return world_size_from_env()


def resolve_config(config: dict | str | Path) -> tuple[dict, StreamingMuLoCoConfig, int, int]:
    """Parse and validate everything that can be checked before process groups exist (config.resolve)."""
    return resolve(read_json(config) if isinstance(config, (str, Path)) else config, launched_world_size())


def init_distributed(timeout_s: float) -> None:
    """Start torch.distributed with the accelerator's backend (gloo on CPU, NCCL on CUDA)."""
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    if backend == "ccl":  # DeepSpeed's CPU accelerator names oneCCL; gloo needs nothing extra
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def plan_fragments(model: torch.nn.Module, cfg: StreamingMuLoCoConfig) -> list[list[str]]:
    """The names of the trainable parameters of each fragment, or a ConfigError naming the key.

    A pure function of the model, so it runs before any process group (a model with fewer
    blocks than fragments is a config error found at once, not after the rendezvous).
    """
    from .config import SECTION
    from .fragments import assign_fragments

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    try:
        return assign_fragments(names, cfg.num_fragments, strategy=cfg.fragment_strategy)
    except ValueError as e:
        if str(e).startswith(("num_fragments", "fragment_strategy")):
            raise ConfigError(f"{SECTION}.{e}") from None
        raise ConfigError(f"cannot split the model into {SECTION}.num_fragments ({cfg.num_fragments}) "
                          f"fragments: {e}") from None


class StreamingMuLoCoEngine:
    """A DeepSpeed engine whose `step()` also runs the outer loop.

    Everything not defined here is forwarded to the wrapped `deepspeed.DeepSpeedEngine`.
    """

    def __init__(self, engine: Any, cfg: StreamingMuLoCoConfig, topo: Topology, metrics: MetricsLogger,
                 fragments: list[list[str]] | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.topo = topo
        self.metrics = metrics
        self.inner_steps = 0
        self.nonfinite_skipped = 0
        self.phase = "start-up"
        self.outer = None
        if cfg.enabled:
            from .comm import make_backend
            from .outer_sync import OuterSync
            from .sync_observer import SyncObserver
            from .zero_shard import ZeroShard

            named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
            self.fragments = fragments if fragments is not None else plan_fragments(engine.module, cfg)
            shard = ZeroShard(engine.optimizer, named, self.fragments)
            comm = make_backend(cfg.comm.backend, topo, cfg.comm.timeout_s)
            observer = SyncObserver(metrics, topo.replica_sum_async if topo.ranks_per_replica > 1 else None)
            self.outer = OuterSync(cfg, topo.replica_id, shard, comm, observer)

    def save_checkpoint(self, save_dir: str | Path, step: int | None = None) -> Path:
        """Atomic checkpoint of everything, DeepSpeed's state and ours, as save_dir/step{N}.

        Collective: every rank calls it at the same step. Unlike DeepSpeed's method there is no
        free-form tag: the step names the checkpoint, and `save_dir/latest` points at it.
        """
        from . import checkpoint

        return checkpoint.save(self, save_dir, self.inner_steps if step is None else step)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore from save_dir/step{N} (or save_dir, meaning its `latest`); returns N."""
        from . import checkpoint

        path = Path(path)
        if not (path / checkpoint.MANIFEST).exists():
            latest = checkpoint.find_latest(path)
            if latest is None:
                raise checkpoint.CheckpointError(f"no checkpoint found in '{path}' (no 'latest' file)")
            path = latest
        return checkpoint.load(self, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> Any:
        """Backward, unless the loss is NaN/inf (policy `nonfinite_policy`).

        A non-finite loss would put NaN into the gradients and from there into Adam's moments
        for good. "skip" backpropagates an exact zero instead (the batch is dropped, the
        optimizer state stays clean); "error" stops the run.
        """
        self.phase = f"backward of inner step {self.inner_steps + 1} (gradient reduction within replica " \
                     f"{self.topo.replica_id})"
        if not bool(torch.isfinite(loss.detach()).all()):
            where = f"rank {self.topo.rank} (replica {self.topo.replica_id}) inner step {self.inner_steps + 1}"
            if self.cfg.nonfinite_policy == "error":
                from .errors import NonFiniteError
                raise NonFiniteError(f"{where}: the loss is {loss.item()} (streaming_muloco.nonfinite_policy="
                                     f"'error'); restart from the last checkpoint with --resume, perhaps with a "
                                     f"lower learning rate")
            log.warning("%s: non-finite loss %s; skipping this batch", where, loss.item())
            self.nonfinite_skipped += 1
            self.metrics.scalar("train/nonfinite_loss_skipped", self.nonfinite_skipped, self.inner_steps + 1)
            loss = sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
        return self.engine.backward(loss)

    def step(self) -> None:
        """One micro-step; at an accumulation boundary also one inner step and its outer syncs."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.outer is not None:
            self.outer.poke()
        self.phase = f"inner step {self.inner_steps + 1} (optimizer step within replica {self.topo.replica_id})"
        self.engine.step()
        if boundary:
            self.inner_steps += 1
            if self.outer is not None:
                self.phase = (f"outer sync after inner step {self.inner_steps} (collective with the shard-"
                              f"{self.topo.shard_id} ranks {self.topo.outer_ranks(self.topo.shard_id)} of the "
                              f"other replicas)")
                self.outer.after_inner_step(self.inner_steps)

    @property
    def replica_id(self) -> int:
        return self.topo.replica_id

    @property
    def shard_id(self) -> int:
        return self.topo.shard_id

    def muon_param_names(self) -> list[str]:
        return muon_param_names(self.engine.module)


def initialize(model: torch.nn.Module, config: dict | str | Path,
               model_parameters: Iterable[Any] | None = None, metrics: MetricsLogger | None = None,
               **ds_kwargs: Any) -> tuple[StreamingMuLoCoEngine, Any, Any, Any]:
    """Like `deepspeed.initialize`, for a config that may hold a `streaming_muloco` section.

    Returns (engine, optimizer, training_dataloader, lr_scheduler) as DeepSpeed does.
    Config errors are raised before any process group is created.
    """
    ds_config, cfg, K, D = resolve_config(config)
    fragments = plan_fragments(model, cfg) if cfg.enabled else None
    import deepspeed

    init_distributed(cfg.comm.timeout_s)
    topo = Topology.build(K, D, cfg.comm.timeout_s)
    # Replicas must start from identical weights whatever each process's seed did. The model
    # moves to the engine's device first, since NCCL cannot broadcast host tensors.
    from deepspeed.accelerator import get_accelerator

    model.to(get_accelerator().current_device_name())
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    if uses_muon(ds_config):
        install_update_scale(cfg.inner.muon_update_scale)
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        model=model, model_parameters=model_parameters if model_parameters is not None else model.parameters(),
        config=ds_config, mpu=topo.mpu(), **ds_kwargs)
    wrapped = StreamingMuLoCoEngine(engine, cfg, topo, metrics or MetricsLogger(), fragments)
    wrapped.metrics.text("config/streaming_muloco", json.dumps(dataclasses.asdict(cfg)))
    return wrapped, optimizer, loader, scheduler


__all__ = ["initialize", "StreamingMuLoCoEngine", "ConfigError", "resolve_config"]
