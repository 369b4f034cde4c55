"""`streaming_muloco.initialize`: `deepspeed.initialize` plus the outer loop.

A DeepSpeed script changes by one import and one config section:

    engine, optimizer, _, scheduler = streaming_muloco.initialize(model=model, config="ds.json")
    for step in ...:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()          # inner step; outer syncs run on schedule inside it
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("streaming_muloco")

from .config import ConfigError, StreamingMuLoCoConfig, read_json, resolve, world_size_from_env
from .inner import install_update_scale, muon_param_names, uses_muon
from . import param_roles
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
    # Under mpirun DeepSpeed discovers rank and master from MPI, on port `distributed_port`
    # (29500 unless given): MASTER_PORT lets two jobs on one host (replica jobs) both start.
    import os

    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               distributed_port=port)


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


def plan_roles(model: torch.nn.Module, cfg: StreamingMuLoCoConfig) -> param_roles.RoleSplit:
    """Muon or AdamW for each parameter (param_roles.py), or a ConfigError naming the key."""
    from .config import SECTION

    try:
        return param_roles.split_roles(model, cfg.inner.adamw_params)
    except ValueError as e:
        raise ConfigError(f"{SECTION}.inner.{e}") from None


def estimate_checkpoint_nbytes(model: torch.nn.Module, ds_config: dict, cfg: StreamingMuLoCoConfig,
                               num_replicas: int) -> tuple[int, str]:
    """An upper estimate of one checkpoint's size on disk, for the pre-flight space check.

    Per replica, with N trainable parameters: DeepSpeed's module file (N x 2 bytes under
    fp16/bf16, else 4, plus buffers), ZeRO's fp32 master partitions (4N) and optimizer moments
    (8N: Adam's two; Muon keeps one for its matrices, so this bounds it); ours: theta_g and the
    outer momentum (8N), an error-feedback residual when compressing with it (4N), and with
    sync_delay > 0 the averaged pseudo-gradient of a fragment in flight (4N/P; with eager updates
    4N for `others` and up to 4N in flight). Times K
    replicas, plus 10% and 1 MiB for serialization overhead and DeepSpeed's recovery scripts.
    Returns (bytes, a one-line account of them for the error message).
    """
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    half = any(isinstance(ds_config.get(k), dict) and ds_config[k].get("enabled") for k in ("fp16", "bf16"))
    deepspeed_b = n * (2 if half else 4) + buffers + 4 * n + 8 * n
    ours = 0
    if cfg.enabled:
        ours = 8 * n
        if cfg.compression.method != "none" and cfg.compression.error_feedback:
            ours += 4 * n
        if cfg.eager_updates:  # others[p] for every fragment, and up to all P fragments in flight
            ours += 4 * n + (4 * n if cfg.sync_delay > 0 else 0)
        elif cfg.sync_delay > 0:
            ours += 4 * n // cfg.num_fragments
    total = int((deepspeed_b + ours) * num_replicas * 1.1) + (1 << 20)
    detail = (f"{n:,} parameters x {num_replicas} replica(s): DeepSpeed's module, fp32 master and optimizer "
              f"moments {deepspeed_b / n if n else 0:.0f} B/param, outer state {ours / n if n else 0:.0f} B/param, "
              f"+10% +1 MiB")
    return total, detail


@contextlib.contextmanager
def _durable_deepspeed_saves(ds_engine: Any) -> Iterator[list[Path]]:
    """Route DeepSpeed's checkpoint file writes through `checkpoint.torch_save` (fsync'ed, and
    a full disk raises OSError with its errno), and hold back their errors until DeepSpeed's
    save_checkpoint has run its remaining barriers, so that no peer is left waiting in one.

    DeepSpeed 0.19 writes a checkpoint's files through `checkpoint_engine.save` and, on rank
    0, `_copy_recovery_script` (zero_to_fp32.py); both are wrapped. Yields the list of files
    written; re-raises the first error on exit.
    """
    from . import checkpoint

    ce = ds_engine.checkpoint_engine
    plain_torch = type(ce).__name__ == "TorchCheckpointEngine"  # others (async, Nebula) keep their own writer
    written: list[Path] = []
    errors: list[BaseException] = []

    def held_back(write: Callable[[], None]) -> None:
        if errors:
            return  # the checkpoint is lost anyway; just reach DeepSpeed's barriers
        try:
            write()
        except Exception as e:  # noqa: BLE001 - re-raised after DeepSpeed's barriers
            errors.append(e)

    original_save, original_copy = ce.save, ds_engine._copy_recovery_script

    def save(state_dict: Any, path: str) -> None:  # DeepSpeed calls it with keywords
        def write() -> None:
            if plain_torch:
                checkpoint.torch_save(state_dict, path,
                                      _use_new_zipfile_serialization=getattr(ce, "zipfile_serialization", True))
            else:
                original_save(state_dict, path)
            written.append(Path(path))
        held_back(write)

    def copy_recovery_script(save_path: str) -> None:
        held_back(lambda: original_copy(save_path))

    patched = [(ce, "save", save), (ds_engine, "_copy_recovery_script", copy_recovery_script)]
    shadowed = [vars(obj).get(name) for obj, name, _ in patched]
    for obj, name, fn in patched:
        setattr(obj, name, fn)
    try:
        yield written
    finally:
        for (obj, name, _), old in zip(patched, shadowed):
            if old is None:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, old)
    if errors:
        raise errors[0]


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
        self.membership = None
        if cfg.enabled:
            from .comm import make_backend
            from .outer_sync import OuterSync
            from .sync_observer import SyncObserver
            from .segments import param_kinds
            from .zero_shard import ZeroShard

            named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
            self.fragments = fragments if fragments is not None else plan_fragments(engine.module, cfg)
            shard = ZeroShard(engine.optimizer, named, self.fragments, param_kinds(engine.module))
            if topo.fault_tolerant:
                from .fault_tolerance import FaultTolerance

                self.membership = FaultTolerance(topo.replica_id, topo.shard_id, topo.ranks_per_replica,
                                                 cfg.fault_tolerance, self.replica_fingerprint(), engine.device,
                                                 self._heal_state, self._load_heal_state, metrics)
                comm = self.membership.comm
            else:
                comm = make_backend(cfg.comm.backend, topo, cfg.comm.timeout_s)
            observer = SyncObserver(metrics, topo.replica_sum_async if topo.ranks_per_replica > 1 else None)
            self.outer = OuterSync(cfg, topo.replica_id, shard, comm, observer, membership=self.membership)

    # ---- fault tolerance (docs/design.md §6.1): the engine's side lives in replica_job.py ----
    def replica_fingerprint(self) -> dict[str, Any]:
        from .replica_job import replica_fingerprint
        return replica_fingerprint(self)

    def _heal_state(self) -> dict[str, Any]:
        from .replica_job import heal_state
        return heal_state(self)

    def _load_heal_state(self, state: dict[str, Any]) -> None:
        from .replica_job import load_heal_state
        load_heal_state(self, state)

    def join_replicas(self, step: int) -> int:
        """Meet the other replicas of a fault-tolerant run before training (no-op otherwise);
        returns the inner step to continue after (a late joiner's is its peers')."""
        from .replica_job import join_replicas
        return join_replicas(self, step)

    # ---- checkpoints ----------------------------------------------------------------------
    # checkpoint.py owns directories, atomicity and the manifest; this engine decides what goes
    # in: DeepSpeed's own files (module, ZeRO partitions, LR scheduler) via its save_checkpoint
    # into replica{k}/, and per rank our state_dict() as replica{k}/rank_state{d}.pt. Each
    # replica is its own DeepSpeed data-parallel group, hence its own directory (DeepSpeed's
    # file names would collide).

    # What a fingerprint key means for the user, appended to a refused resume.
    _FINGERPRINT_FIX = {
        "scheduler.params.total_num_steps":
            "the LR schedule's length changed (with \"auto\" it follows --steps): DeepSpeed restores only the "
            "scheduler's step counter, so every remaining step would get a different learning rate. Resume with the "
            "original --steps, or, to extend the run on purpose, set the length explicitly: --set "
            "scheduler.params.total_num_steps=N (N = the saved value keeps the saved schedule, which holds its final "
            "LR after it ends; a larger N stretches the rest of it)",
    }

    def fingerprint(self) -> dict[str, Any]:
        """What must not change across a resume: shapes of sharded and per-fragment state, and
        the LR schedule's length (DeepSpeed saves the scheduler's step, not its config)."""
        cfg, topo = self.cfg, self.topo
        sched = self.engine.scheduler_params() if self.engine.scheduler_name() else None
        return {"world_size": topo.world_size, "num_replicas": topo.num_replicas,
                "ranks_per_replica": topo.ranks_per_replica,
                "num_fragments": cfg.num_fragments if cfg.enabled else 1,
                "outer_loop": cfg.enabled,
                "compression": {"method": cfg.compression.method, "bits": cfg.compression.bits,
                                "block_size": cfg.compression.block_size,
                                "topk_fraction": cfg.compression.topk_fraction,
                                "collective": cfg.compression.collective,
                                # only when set, so checkpoints from before the key still resume
                                **({"granularity": cfg.compression.granularity}
                                   if cfg.compression.granularity != "flat" else {})} if cfg.enabled else None,
                # eager state (others[p]) is saved only with it on; only when set, as above
                **({"eager_updates": True} if cfg.enabled and cfg.eager_updates else {}),
                "zero_stage": self.engine.zero_optimization_stage(),
                "scheduler.params.total_num_steps": (sched or {}).get("total_num_steps")}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state beyond DeepSpeed's: step count, outer loop, RNG streams.

        DeepSpeed's engine, ZeRO and scheduler state are not in here: they are written by
        DeepSpeed's own save_checkpoint (see `save_checkpoint`). The module's weights, which
        DeepSpeedEngine.state_dict() would return, are at `engine.module.state_dict()`. Waits
        for a fragment in flight.
        """
        return {"inner_steps": self.inner_steps, "nonfinite_skipped": self.nonfinite_skipped,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "outer": self.outer.state_dict() if self.outer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_steps = state["inner_steps"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def save_checkpoint(self, save_dir: str | Path, step: int | None = None, keep_last: int = 0) -> Path:
        """Atomic checkpoint of everything, DeepSpeed's state and ours, as save_dir/step{N}.

        Collective: every rank calls it at the same step. Unlike DeepSpeed's method there is no
        free-form tag: the step names the checkpoint, and `save_dir/latest` points at it.
        `keep_last` > 0 deletes older checkpoints beyond the newest `keep_last`.
        """
        from . import checkpoint

        return checkpoint.save(save_dir, self.inner_steps if step is None else step, self.fingerprint(),
                               self._write_checkpoint, keep_last=keep_last)

    def load_checkpoint(self, path: str | Path, missing_ok: bool = False,
                        may_change: Iterable[str] = ()) -> int | None:
        """Restore from save_dir/step{N} (or save_dir, meaning its `latest`); returns N.

        None when `missing_ok` and nothing was saved there yet. `may_change`: fingerprint keys
        the caller changed on purpose (rank 0 logs each change instead of refusing).
        """
        from . import checkpoint

        loaded = checkpoint.load(path, self.fingerprint(), self._read_checkpoint, may_change=tuple(may_change),
                                 hints=self._FINGERPRINT_FIX, missing_ok=missing_ok)
        if loaded is None:
            return None
        self.loaded_checkpoint = loaded
        for key, (old, new) in loaded.changed.items():
            if self.topo.rank == 0:
                log.warning("resuming from %s with %s changed on purpose: saved %s, now %s", loaded.path, key, old, new)
        return loaded.step

    def _write_checkpoint(self, directory: Path) -> list[Path]:
        """checkpoint.save's writer: DeepSpeed's files, then ours; returns what this rank wrote."""
        from . import checkpoint

        tag = f"replica{self.topo.replica_id}"
        with _durable_deepspeed_saves(self.engine) as written:
            self.engine.save_checkpoint(str(directory), tag=tag, client_state={"inner_steps": self.inner_steps},
                                        save_latest=False)
        own = directory / tag / f"rank_state{self.topo.shard_id}.pt"
        checkpoint.torch_save(self.state_dict(), own)
        return written + [own]

    def _read_checkpoint(self, directory: Path) -> int:
        from .errors import CheckpointError

        tag = f"replica{self.topo.replica_id}"
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint '{directory / tag}'")
        self.load_state_dict(torch.load(directory / tag / f"rank_state{self.topo.shard_id}.pt", weights_only=False))
        return self.inner_steps

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
            clipper = getattr(self.engine, "muon_grad_clipper", None)
            if clipper is not None and clipper.last_norm is not None:  # grad_clip.py: norm before clipping
                self.metrics.scalar("train/grad_norm_raw", float(clipper.last_norm), self.inner_steps)
            if self.outer is not None:
                peers = ("torchft quorum" if self.topo.fault_tolerant
                         else f"ranks {self.topo.outer_ranks(self.topo.shard_id)}")
                self.phase = (f"outer sync after inner step {self.inner_steps} (collective with the shard-"
                              f"{self.topo.shard_id} ranks of the other replicas, {peers})")
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
    roles = plan_roles(model, cfg) if uses_muon(ds_config) else None
    import deepspeed

    init_distributed(cfg.comm.timeout_s)
    if cfg.enabled and cfg.fault_tolerance.enabled:
        topo = Topology.build_replica_job(K, D, cfg.fault_tolerance.replica_id, cfg.comm.timeout_s)
    else:
        topo = Topology.build(K, D, cfg.comm.timeout_s)
    # Replicas must start from identical weights whatever each process's seed did. The model
    # moves to the engine's device first, since NCCL cannot broadcast host tensors.
    from deepspeed.accelerator import get_accelerator

    model.to(get_accelerator().current_device_name())
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    # Muon: DeepSpeed would clip the orthogonalised update, so it gets 0 and grad_clip.py clips
    # the raw gradient before Muon instead (the config check allows this on ZeRO stages 1-3).
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    clip = float(ds_config.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT)) if roles is not None else 0.0
    if clip > 0:
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    tagging = contextlib.nullcontext()
    if roles is not None:
        install_update_scale(cfg.inner.muon_update_scale)
        tagging = param_roles.deepspeed_tags_from(roles)
        if dist.get_rank() == 0:
            print("[streaming_muloco] inner optimizer roles by module (streaming_muloco.inner.adamw_params "
                  "overrides):\n  " + roles.summary().replace("\n", "\n  "), flush=True)
    with tagging:
        engine, optimizer, loader, scheduler = deepspeed.initialize(
            model=model, model_parameters=model_parameters if model_parameters is not None else model.parameters(),
            config=ds_config, mpu=topo.mpu(), **ds_kwargs)
    if clip > 0:
        from .grad_clip import MuonGradClipper

        engine.muon_grad_clipper = MuonGradClipper(engine.optimizer, clip)
    wrapped = StreamingMuLoCoEngine(engine, cfg, topo, metrics or MetricsLogger(), fragments)
    wrapped.metrics.text("config/streaming_muloco", json.dumps(dataclasses.asdict(cfg)))
    return wrapped, optimizer, loader, scheduler


__all__ = ["initialize", "StreamingMuLoCoEngine", "ConfigError", "resolve_config"]
