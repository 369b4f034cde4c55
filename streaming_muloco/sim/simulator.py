"""K replicas in one process: quality sweeps without launching K DeepSpeed ranks.

What is simulated is what a K x 1 DeepSpeed job (`train.py`, D = 1) computes, step for step:
- replica k is one model copy fed the batches of stream k (`get_batch(train, micro, block,
  seed, stream=k, step)`), with its own inner optimizer built the way DeepSpeed builds it from
  the same JSON (`sim/inner_optimizer.py`);
- the outer loop is NOT re-implemented: each replica gets its own `OuterSync` (the very same
  schedule, fragments, outer optimizer and `PseudoGradExchange` as the distributed path) over
  a `ModuleShard` and an `InProcessBackend` (`sim/inprocess.py`). After every inner step the
  schedule's events run for all replicas, event by event (poking every replica first, as
  engine.step does), so every collective is launched before it is waited on;
- with no `streaming_muloco` section (or enabled=false) it is DP over `dp_world` ranks: one
  model stepped on the mean gradient of streams 0..dp_world-1.

The agreement with a real 2-process DeepSpeed job is pinned by tests/test_simulator.py.

    from streaming_muloco.sim import simulate
    res = simulate(json.load(open("ds_configs/muloco_cpu.json")), steps=300, eval_every=60)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from ..comm.base import wire_bytes
from ..config import SECTION, split_config
from ..data import EVAL_STREAM, TokenSplits, get_batch, load_tokens
from ..errors import ConfigError
from ..fragments import assign_fragments
from ..metrics import MetricsLogger
from ..model import GPT, build_model
from ..outer_sync import OuterSync
from ..segments import ParamExtent, kind_for, param_kinds
from ..sync_observer import SyncObserver
from .inner_optimizer import InnerOptimizer
from .inprocess import InProcessBackend, InProcessGroup

StepCallback = Callable[[int, list[GPT]], None]


class ModuleShard:
    """ZeroShard's interface over a plain module's parameters: with D = 1 a shard is the whole
    fragment, and the module's own fp32 params are the masters (nothing to refresh)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], fragments: list[list[str]],
                 kinds: dict[str, str] | None = None) -> None:
        by_name = dict(named_params)
        self.params = [[by_name[n] for n in names] for names in fragments]
        self.names = [list(names) for names in fragments]
        self.kinds = kinds or {}
        self.numels = [sum(p.numel() for p in params) for params in self.params]

    def extents(self, fragment_id: int) -> list[ParamExtent]:
        """Every parameter whole, in fragment order (D = 1)."""
        return [ParamExtent(n, kind_for(self.kinds, n, tuple(p.shape)), tuple(p.shape), 0, p.numel())
                for n, p in zip(self.names[fragment_id], self.params[fragment_id])]

    @torch.no_grad()
    def gather(self, fragment_id: int) -> torch.Tensor:
        """A fresh flat fp32 copy of the fragment's parameters."""
        params = self.params[fragment_id]
        if not params:
            return torch.empty(0, dtype=torch.float32)
        return torch.cat([p.detach().reshape(-1).float() for p in params])

    @torch.no_grad()
    def scatter(self, fragment_id: int, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params[fragment_id]:
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()

    def refresh_module_params(self) -> None:
        pass


class _Run:
    """Models, inner optimizers and (for DiLoCo-style runs) one OuterSync per replica."""

    def __init__(self, ds: dict, cfg: Any, base: GPT, K: int, threads: bool) -> None:
        self.models = [copy.deepcopy(base) for _ in range(K)]
        self.inner = [InnerOptimizer(m, ds, cfg.inner.adamw_params) for m in self.models]
        self.outer: list[OuterSync] = []
        self.pool = ThreadPoolExecutor(max_workers=K) if threads and K > 1 else None
        if cfg.enabled:
            # Compress inline: the replicas take turns on one thread, and each event must have
            # launched every replica's collective before any waits. Background compression
            # changes when a payload is launched, not its bytes (tests/test_compressed_multirank.py).
            cfg = dataclasses.replace(cfg, compression=dataclasses.replace(cfg.compression, background=False))
            group = InProcessGroup(K, wait_timeout_s=cfg.comm.timeout_s if self.pool else 0.0)
            for k, m in enumerate(self.models):
                named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
                frags = assign_fragments([n for n, _ in named], cfg.num_fragments, strategy=cfg.fragment_strategy)
                shard = ModuleShard(named, frags, param_kinds(m))
                self.outer.append(OuterSync(cfg, k, shard, InProcessBackend(group, k),
                                            SyncObserver(MetricsLogger())))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def outer_events(self, step: int) -> None:
        """The schedule's events after `step`, each for every replica before the next.

        Every replica is poked before each event (engine.step pokes too): an exchange whose
        first collective is complete launches its next one there, e.g. two-phase's all-gather,
        so no replica waits on a collective that another has yet to launch. (`ModuleShard`
        has nothing to refresh after a finish, so `OuterSync.after_inner_step`'s refresh is
        not needed here.)
        """
        for event in self.outer[0].schedule.events(step):
            for o in self.outer:
                o.poke()
            if self.pool is not None:
                list(self.pool.map(lambda o: o.handle(event, step), self.outer))
            else:
                for o in self.outer:
                    o.handle(event, step)


def simulate(ds_config: dict, *, steps: int, model: str = "tiny", model_overrides: dict | None = None,
             seed: int = 1234, micro_batch: int | None = None, block_size: int | None = None,
             eval_every: int = 60, eval_batches: int = 8, eval_micro_batch: int | None = None,
             splits: TokenSplits | None = None, data: str = "shakespeare", data_dtype: str = "uint16",
             val_fraction: float = 0.05, dp_world: int = 1, log_every: int = 10, replica_threads: bool = False,
             on_step: StepCallback | None = None, verbose: bool = False) -> dict[str, Any]:
    """Train as a K x 1 DeepSpeed job (or DP over `dp_world` ranks) would; return its history.

    Args:
        ds_config: a DeepSpeed config dict, optionally with a streaming_muloco section (K from
            its num_replicas; ranks_per_replica must be 0 or 1). Not modified.
        steps: inner optimizer steps; also fills `scheduler.params.total_num_steps: "auto"`.
        model, model_overrides, block_size: `build_model(model, **overrides)`, seeded by `seed`.
        micro_batch: sequences per replica (per DP rank) per micro-step; default the config's
            train_micro_batch_size_per_gpu.
        eval_every, eval_batches: as train.py: eval batch i of range(eval_batches * world) comes
            from stream EVAL_STREAM and is scored by replica i % K (DP: the one model).
        eval_micro_batch: sequences per eval batch; default micro_batch (as train.py).
        splits: train/val tokens; default the `data` corpus split like train.py.
        dp_world: ranks of the DP baseline (ignored with an enabled streaming_muloco section).
        log_every: train loss is averaged over this many steps (and over replicas).
        replica_threads: run the outer phases with one thread per replica; needed only by an
            exchange that launches a collective inside wait() that poke() did not launch.
        on_step: called as on_step(step, models) after each step's outer syncs.

    Returns:
        {"eval_loss": [(step, loss)], "train_loss": [(step, loss)], "final_eval_loss", "tokens",
         "tokens_per_step", "outer_steps", "bytes_sent_per_replica", "seconds", ...}.
    """
    ds, cfg = split_config(copy.deepcopy(ds_config))
    for key in ("fp16", "bf16"):
        if (ds.get(key) or {}).get("enabled"):
            raise ConfigError(f"{key}.enabled is not supported by the simulator (it runs fp32); disable it")
    sched_params = (ds.get("scheduler") or {}).get("params")
    if isinstance(sched_params, dict) and sched_params.get("total_num_steps") == "auto":
        sched_params["total_num_steps"] = steps
    if cfg.enabled and cfg.ranks_per_replica not in (0, 1):
        raise ConfigError(f"{SECTION}.ranks_per_replica ({cfg.ranks_per_replica}) must be 1 (or 0) in the "
                          f"simulator: each replica is one model copy")
    if dp_world < 1:
        raise ValueError(f"dp_world ({dp_world}) must be >= 1")
    K = cfg.num_replicas if cfg.enabled else 1
    world = K if cfg.enabled else dp_world
    accum = int(ds.get("gradient_accumulation_steps", 1))
    micro = micro_batch or ds.get("train_micro_batch_size_per_gpu")
    if not micro:
        if "train_batch_size" not in ds:
            raise ConfigError("train_micro_batch_size_per_gpu is missing: set it in the config or pass micro_batch")
        micro = ds["train_batch_size"] // (accum * world)
    if steps < 1 or eval_every < 1 or eval_batches < 1 or log_every < 1:
        raise ValueError(f"steps ({steps}), eval_every ({eval_every}), eval_batches ({eval_batches}) and "
                         f"log_every ({log_every}) must all be >= 1")
    eval_micro = eval_micro_batch or micro

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; replicas run one after another anyway
    from deepspeed.runtime.zero.muon import original_muon

    prev_scale = original_muon._aspect_ratio_scale
    try:
        # DeepSpeed's muon_update is torch.compile'd; the distributed tests run it eagerly
        # (TORCHDYNAMO_DISABLE=1), and so does the simulator: same numbers, no compile time.
        import torch._dynamo as dynamo

        with dynamo.config.patch(disable=True):
            if str((ds.get("optimizer") or {}).get("type", "")).lower() == "muon":
                from ..inner import install_update_scale
                install_update_scale(cfg.inner.muon_update_scale)
            overrides = dict(model_overrides or {})
            if block_size is not None:
                overrides["block_size"] = block_size
            torch.manual_seed(seed)
            base = build_model(model, **overrides)
            block = base.cfg.block_size
            if splits is None:
                splits = TokenSplits.from_tokens(load_tokens(data, data_dtype, base.cfg.vocab_size), val_fraction,
                                                 block)
            run = _Run(ds, cfg, base, K, replica_threads)
            try:
                return _train(run, splits, steps=steps, seed=seed, micro=micro, accum=accum, block=block,
                              world=world, streams_per_model=1 if cfg.enabled else dp_world, eval_every=eval_every,
                              eval_batches=eval_batches, eval_micro=eval_micro, log_every=log_every,
                              on_step=on_step, verbose=verbose)
            finally:
                run.close()
    finally:
        original_muon._aspect_ratio_scale = prev_scale
        torch.set_num_threads(prev_threads)


def _train(run: _Run, splits: TokenSplits, *, steps: int, seed: int, micro: int, accum: int, block: int,
           world: int, streams_per_model: int, eval_every: int, eval_batches: int, eval_micro: int,
           log_every: int, on_step: StepCallback | None, verbose: bool) -> dict[str, Any]:
    tokens_per_step = micro * accum * block * world
    history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
    t0 = time.perf_counter()
    loss_acc, loss_n = 0.0, 0
    for step in range(1, steps + 1):
        for k, (m, inner) in enumerate(zip(run.models, run.inner)):
            for micro_step in range(accum):
                # DP: one model, the concatenated batches of all its streams = the mean gradient.
                streams = [k] if streams_per_model == 1 else range(streams_per_model)
                xs, ys = zip(*(get_batch(splits.train, micro, block, seed, s, (step - 1) * accum + micro_step)
                               for s in streams))
                loss = m(torch.cat(xs), torch.cat(ys))
                (loss / accum).backward()  # DeepSpeed scales the loss by 1/gradient_accumulation_steps
                loss_acc += loss.item()
                loss_n += 1
            inner.step()
        if run.outer:
            run.outer_events(step)
        if on_step is not None:
            on_step(step, run.models)
        diverged = not math.isfinite(loss_acc)
        if step % log_every == 0 or step == steps or diverged:
            history["train_loss"].append((step, loss_acc / loss_n))
            loss_acc, loss_n = 0.0, 0
        if diverged:  # nothing to learn from the remaining steps; callers see an inf eval loss
            history["eval_loss"].append((step, math.inf))
            break
        if step % eval_every == 0 or step == steps:
            val = evaluate(run.models, splits, eval_micro, block, seed, eval_batches, world)
            history["eval_loss"].append((step, val))
            if verbose:
                print(f"  step {step:>5}/{steps} | train {history['train_loss'][-1][1]:.4f} | eval {val:.4f} | "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    n_params = run.models[0].num_params()
    if run.outer:
        bytes_sent = [o.comm.bytes_sent for o in run.outer]
        outer_steps = [o.outer_steps for o in run.outer]
    else:  # the DDP ring all-reduce model (docs/design.md §5), not a measurement
        bytes_sent = [step * wire_bytes("all_reduce", 4 * n_params, world)]
        outer_steps = [0]
    return {"eval_loss": history["eval_loss"], "train_loss": history["train_loss"],
            "final_eval_loss": history["eval_loss"][-1][1], "diverged": diverged, "steps": step,
            "tokens": step * tokens_per_step, "tokens_per_step": tokens_per_step, "num_replicas": len(run.models),
            "world": world, "num_params": n_params, "outer_steps": outer_steps, "bytes_sent_per_replica": bytes_sent,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(models: list[GPT], splits: TokenSplits, micro: int, block: int, seed: int, eval_batches: int,
             world: int) -> float:
    """train.py's `evaluate()`: batch i of range(eval_batches*world) on rank i % world's model."""
    total, count = 0.0, 0
    for m in models:
        m.eval()
    for i in range(eval_batches * world):
        m = models[i % len(models)]  # K replicas: rank i % K; DP: every rank holds the same model
        total += m(*get_batch(splits.val, micro, block, seed, EVAL_STREAM, i)).float().item()
        count += 1
    for m in models:
        m.train()
    return total / count
