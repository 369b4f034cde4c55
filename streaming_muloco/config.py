"""The strict, typed `streaming_muloco` section of a DeepSpeed JSON config.

DeepSpeed's own keys stay DeepSpeed's: this module reads our section strictly, and of
DeepSpeed's keys only checks what DeepSpeed itself would reject late (after process groups and
the model exist, with a traceback) or silently get wrong: the optimizer and scheduler types and
the types of their params, the batch keys against each replica's data-parallel size, and a few
combinations known to break Muon. It hands DeepSpeed the config without our section. Every
mistake raises `ConfigError` naming the dotted key and the fix, before any process group is
built. This is the one place where a value is checked against the key it came from: the
algorithm modules (schedule, fragments, outer optimizer) raise plain ValueErrors about their
own arguments, and everything they would refuse is refused here first.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from .errors import ConfigError

SECTION = "streaming_muloco"


@dataclass(frozen=True)
class CompressionConfig:
    """How pseudo-gradients are compressed on the wire (docs/design.md §1 and §5)."""

    method: Literal["none", "linear", "statistical", "e3m0", "topk"] = "none"
    bits: int = 8
    block_size: int = 256
    topk_fraction: float = 0.01
    error_feedback: bool = True
    ef_beta: float = 1.0
    # The official MuLoCo code feeds outer_lr * pseudo_grad into the EF buffer, so its
    # effective outer lr is outer_lr squared; true reproduces that.
    ef_scale_by_outer_lr: bool = False
    collective: Literal["single_phase", "two_phase"] = "single_phase"

    def validate(self, prefix: str) -> None:
        if self.method in ("linear", "statistical") and self.bits not in (2, 4, 8):
            raise ConfigError(f"{prefix}.bits ({self.bits}) must be 2, 4 or 8 for method '{self.method}'")
        if self.method == "e3m0" and self.bits != 4:
            raise ConfigError(f"{prefix}.bits ({self.bits}) must be 4 for method 'e3m0' (4-bit floats)")
        if self.block_size < 1:
            raise ConfigError(f"{prefix}.block_size ({self.block_size}) must be >= 1")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"{prefix}.topk_fraction ({self.topk_fraction}) must be in (0, 1]")
        if not 0.0 < self.ef_beta <= 1.0:
            raise ConfigError(f"{prefix}.ef_beta ({self.ef_beta}) must be in (0, 1]; 1.0 is classic error feedback")


@dataclass(frozen=True)
class CommConfig:
    """Which library carries the outer collectives across replicas."""

    backend: Literal["torch", "mpi"] = "torch"
    timeout_s: float = 600.0

    def validate(self, prefix: str) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.timeout_s ({self.timeout_s}) must be > 0 seconds")


@dataclass(frozen=True)
class InnerConfig:
    """Options on top of DeepSpeed's inner optimizer."""

    # "deepspeed": DeepSpeed Muon's own scale sqrt(max(1, rows/cols)).
    # "moonlight": 0.2*sqrt(max(rows, cols)), which matches AdamW's update RMS (Moonlight).
    muon_update_scale: Literal["deepspeed", "moonlight"] = "deepspeed"

    def validate(self, prefix: str) -> None:
        pass


@dataclass(frozen=True)
class StreamingMuLoCoConfig:
    """K replicas x D ZeRO ranks; DiLoCo/MuLoCo outer loop with streaming fragments."""

    enabled: bool = True
    num_replicas: int = 1  # K
    ranks_per_replica: int = 0  # D; 0 means world_size / num_replicas
    sync_every: int = 30  # H
    num_fragments: int = 1  # P
    sync_delay: int = 0  # tau
    mix_alpha: float = 0.0  # alpha
    fragment_strategy: Literal["strided", "sequential"] = "strided"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    nonfinite_policy: Literal["skip", "error"] = "skip"
    inner: InnerConfig = field(default_factory=InnerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def validate(self) -> None:
        p = SECTION
        if self.num_replicas < 1:
            raise ConfigError(f"{p}.num_replicas ({self.num_replicas}) must be >= 1: it is K, the number of replicas "
                              f"(world size = K x D)")
        if self.ranks_per_replica < 0:
            raise ConfigError(f"{p}.ranks_per_replica ({self.ranks_per_replica}) must be >= 1, or 0 to derive it")
        if self.sync_every < 1:
            raise ConfigError(f"{p}.sync_every ({self.sync_every}) must be >= 1 inner step")
        if self.num_fragments < 1:
            raise ConfigError(f"{p}.num_fragments ({self.num_fragments}) must be >= 1; use 1 for plain DiLoCo")
        if self.num_fragments > self.sync_every:
            raise ConfigError(f"{p}.num_fragments ({self.num_fragments}) must be <= sync_every ({self.sync_every}): "
                              f"each fragment needs its own start step; lower num_fragments or raise sync_every")
        if self.sync_delay < 0:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be >= 0; use 0 for no overlap")
        if self.sync_delay >= self.sync_every / self.num_fragments:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be < sync_every/num_fragments "
                              f"({self.sync_every / self.num_fragments:g}): a fragment must finish before the next "
                              f"one starts; lower sync_delay or num_fragments")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise ConfigError(f"{p}.mix_alpha ({self.mix_alpha}) must be in [0, 1]: 0 restarts each replica from "
                              f"the outer result (DiLoCo), 1 keeps its local progress")
        if self.outer_lr <= 0:
            raise ConfigError(f"{p}.outer_lr ({self.outer_lr}) must be > 0; DiLoCo uses 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"{p}.outer_momentum ({self.outer_momentum}) must be in [0, 1); DiLoCo uses 0.9")
        self.inner.validate(f"{p}.inner")
        self.compression.validate(f"{p}.compression")
        self.comm.validate(f"{p}.comm")

    def topology(self, world_size: int) -> tuple[int, int]:
        """(K, D) for this world size, or a ConfigError that prints every factor."""
        K = self.num_replicas
        D = self.ranks_per_replica or (world_size // K if world_size % K == 0 else 0)
        if K * D != world_size:
            raise ConfigError(f"{SECTION}.num_replicas ({K}) x ranks_per_replica ({self.ranks_per_replica or '?'}) "
                              f"must equal the world size ({world_size}); launch {K}*D ranks or change num_replicas")
        return K, D


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Check one JSON value against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} ('{value}') must be one of {list(choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}{_quoted_number_hint(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}{_quoted_number_hint(value)}")
        if not math.isfinite(value):
            raise _non_finite(key, value)
        return float(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    raise TypeError(f"unsupported config field type {tp} at {key}")  # a bug in this module, not user error


def _from_dict(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}.{key} is not a known key{hint}")
        kwargs[key] = _check_type(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_section(raw: dict | None) -> StreamingMuLoCoConfig:
    """Parse and validate the `streaming_muloco` section; None (no section) means plain data parallel."""
    cfg = StreamingMuLoCoConfig(enabled=False) if raw is None else _from_dict(StreamingMuLoCoConfig, raw, SECTION)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Value kinds of DeepSpeed's keys. DeepSpeed passes optimizer and scheduler params straight to a
# constructor, so a string where a number belongs fails only at the first step (or, for Muon,
# an unknown key is dropped without a word); these tables let the check name the dotted key.


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "number": (_is_number, "a number"),
    "number?": (lambda v: v is None or _is_number(v), "a number or null"),
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bool?": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "pair": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v),
             "a list of two numbers, e.g. [0.9, 0.95]"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "warmup_type": (lambda v: v in ("log", "linear"), "'log' or 'linear'"),
}

# Optimizer params by name: the same name means the same thing in every optimizer DeepSpeed builds.
OPTIMIZER_PARAM_KINDS: dict[str, str] = {
    **dict.fromkeys(("lr", "muon_lr", "adam_lr", "eps", "weight_decay", "momentum", "lr_decay",
                     "initial_accumulator_value", "dampening", "alpha", "max_coeff", "min_coeff"), "number"),
    **dict.fromkeys(("torch_adam", "adam_w_mode", "adamw_mode", "amsgrad", "bias_correction",
                     "fp32_optimizer_states", "nesterov", "maximize", "capturable", "differentiable",
                     "eps_inside_sqrt", "set_grad_none", "decoupled_weight_decay", "centered"), "bool"),
    "foreach": "bool?", "fused": "bool?", "betas": "pair", "ns_method": "str",
}
# DeepSpeed's Muon reads only these (engine._MUON_HALF_KEYS, _ADAM_HALF_KEYS, muon_lr/adam_lr and
# the Adam switches) and ignores any other key without a word, so a typo must be refused here.
MUON_PARAMS = ("lr", "muon_lr", "adam_lr", "momentum", "weight_decay", "ns_method", "betas", "eps", "torch_adam",
               "adam_w_mode", "fp32_optimizer_states", "foreach")
# DeepSpeed's own optimizer types, matched case-insensitively (deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS);
# any other type must name a torch.optim class exactly.
DEEPSPEED_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad", "lamb": "Lamb", "lion": "Lion",
                        "muon": "Muon", "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}
_SCHED_WARMUP = {"warmup_num_steps": "int", "warmup_type": "warmup_type", "last_batch_iteration": "int"}
# deepspeed.runtime.lr_schedules: every constructor parameter but the optimizer (a test compares).
DEEPSPEED_SCHEDULERS: dict[str, dict[str, str]] = {
    "WarmupLR": {"warmup_min_lr": "number", "warmup_max_lr": "number?", **_SCHED_WARMUP},
    "WarmupDecayLR": {"total_num_steps": "int", "warmup_min_lr": "number", "warmup_max_lr": "number",
                      **_SCHED_WARMUP},
    "WarmupCosineLR": {"total_num_steps": "int", "warmup_min_ratio": "number", "cos_min_ratio": "number",
                       **_SCHED_WARMUP},
    "OneCycle": {"cycle_min_lr": "number", "cycle_max_lr": "number", "decay_lr_rate": "number",
                 "cycle_first_step_size": "int", "cycle_second_step_size": "int?", "cycle_first_stair_count": "int",
                 "cycle_second_stair_count": "int?", "decay_step_size": "int", "cycle_momentum": "bool",
                 "cycle_min_mom": "number", "cycle_max_mom": "number", "decay_mom_rate": "number",
                 "last_batch_iteration": "int"},
    "LRRangeTest": {"lr_range_test_min_lr": "number", "lr_range_test_step_size": "int",
                    "lr_range_test_step_rate": "number", "lr_range_test_staircase": "bool",
                    "last_batch_iteration": "int"},
}
_SCHED_REQUIRED = {"WarmupDecayLR": ("total_num_steps",), "WarmupCosineLR": ("total_num_steps",),
                   "OneCycle": ("cycle_min_lr", "cycle_max_lr")}
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _quoted_number_hint(value: Any) -> str:
    """'0.02' in quotes is a JSON string; say so, since the two look alike in a config file."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (a JSON string: write {value.strip()} without quotes)"
    return ""


def _non_finite(key: str, value: float) -> ConfigError:
    shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return ConfigError(f"{key} is {shown}: only finite numbers are accepted (NaN and Infinity are not standard "
                       f"JSON, and no setting means them); give a finite number")


def _check_kind(key: str, value: Any, kind: str) -> None:
    ok, what = _KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}{_quoted_number_hint(value)}")


def _unknown_key(key: str, name: str, known: typing.Iterable[str], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"{key} is not a parameter of {what}; {hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_finite(node: Any, path: str = "") -> None:
    """Refuse NaN/Infinity anywhere (Python's json reads them; no DeepSpeed or outer-loop key means them)."""
    if isinstance(node, float) and not math.isfinite(node):
        raise _non_finite(path or "the config", node)
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, _join(path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_finite(value, f"{path}[{i}]")


def _object(ds_config: dict, key: str) -> dict | None:
    """ds_config[key] when present; it must be a JSON object."""
    value = ds_config.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {value!r}")
    return value


def _torch_class(module: Any, name: str, base: type) -> type | None:
    cls = getattr(module, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def _check_against_signature(prefix: str, params: dict, cls: type, what: str) -> None:
    """A torch class's params: no unknown name (the constructor would raise), and numbers/bools where
    the default is one."""
    import inspect

    sig = inspect.signature(cls.__init__)
    named = {n: p for n, p in list(sig.parameters.items())[2:]
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # skip self and params/optimizer
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for name, value in params.items():
        key = f"{prefix}.{name}"
        if name not in named:
            if open_kwargs:
                continue
            raise _unknown_key(key, name, named, what)
        default = named[name].default
        if isinstance(default, bool):
            _check_kind(key, value, "bool")
        elif _is_number(default):
            _check_kind(key, value, "number")
        elif isinstance(default, tuple) and len(default) == 2 and all(_is_number(x) for x in default):
            _check_kind(key, value, "pair")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in params]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]} is missing: {what} needs it")


def check_optimizer(ds_config: dict) -> None:
    """`optimizer`: a type DeepSpeed can build, and params of the right kinds, each named by its dotted key."""
    opt = _object(ds_config, "optimizer")
    if opt is None:
        return  # a client optimizer may be passed to initialize() instead
    if "type" not in opt:
        raise ConfigError(f"optimizer.type is missing: DeepSpeed ignores an optimizer section without one; set it "
                          f"to one of {sorted(DEEPSPEED_OPTIMIZERS.values())}")
    kind = opt["type"]
    params = opt.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"optimizer.params must be a JSON object, got {params!r}")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"optimizer.type must be a string, got {kind!r}")
    torch_cls = None
    if kind.lower() not in DEEPSPEED_OPTIMIZERS:
        import torch

        torch_cls = _torch_class(torch.optim, kind, torch.optim.Optimizer)
        if torch_cls is None:
            known = list(DEEPSPEED_OPTIMIZERS.values())
            close = difflib.get_close_matches(kind.lower(), list(DEEPSPEED_OPTIMIZERS), n=1)
            hint = f"did you mean '{DEEPSPEED_OPTIMIZERS[close[0]]}'? U" if close else "u"
            raise ConfigError(f"optimizer.type '{kind}' is not an optimizer DeepSpeed can build; {hint}se one of "
                              f"{', '.join(known)} (any case), or the exact name of a torch.optim class such as "
                              f"SGD or RMSprop")
    if kind.lower() in ("muadam", "muadamw", "musgd"):
        import importlib.util

        if importlib.util.find_spec("mup") is None:
            raise ConfigError(f"optimizer.type '{kind}' needs the mup package, which is not installed: "
                              f"pip install mup, or use AdamW")
    if "max_grad_norm" in params:
        raise ConfigError("optimizer.params.max_grad_norm is not supported by DeepSpeed; remove it and set the "
                          "top-level \"gradient_clipping\" instead")
    if torch_cls is not None:
        _check_against_signature("optimizer.params", params, torch_cls, f"torch.optim.{kind}")
        return
    muon = kind.lower() == "muon"
    for name, value in params.items():
        key = f"optimizer.params.{name}"
        if muon and name not in MUON_PARAMS:
            raise _unknown_key(key, name, MUON_PARAMS, "DeepSpeed's Muon (it would be ignored silently)")
        if name in OPTIMIZER_PARAM_KINDS:
            _check_kind(key, value, OPTIMIZER_PARAM_KINDS[name])


def check_scheduler(ds_config: dict) -> None:
    """`scheduler`: a type DeepSpeed knows, no unknown params, and numbers where numbers belong."""
    sched = _object(ds_config, "scheduler")
    if sched is None:
        return
    kind = sched.get("type")
    params = sched.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"scheduler.params must be a JSON object, got {params!r}")
    if kind is None:
        raise ConfigError(f"scheduler.type is missing: DeepSpeed ignores a scheduler section without one; set it "
                          f"to one of {', '.join(DEEPSPEED_SCHEDULERS)}")
    if kind in DEEPSPEED_SCHEDULERS:
        table = DEEPSPEED_SCHEDULERS[kind]
        for name, value in params.items():
            key = f"scheduler.params.{name}"
            if name not in table:
                raise _unknown_key(key, name, table, f"DeepSpeed's {kind}")
            if name == "total_num_steps" and value == "auto":
                continue  # filled in by `python -m streaming_muloco.train` (and the simulator) with --steps
            _check_kind(key, value, table[name])
        for name in _SCHED_REQUIRED.get(kind, ()):
            if name not in params:
                raise ConfigError(f"scheduler.params.{name} is missing: DeepSpeed's {kind} needs it")
        return
    import torch

    torch_cls = _torch_class(torch.optim.lr_scheduler, kind, torch.optim.lr_scheduler.LRScheduler) \
        if isinstance(kind, str) else None
    if torch_cls is None:
        close = difflib.get_close_matches(str(kind), list(DEEPSPEED_SCHEDULERS), n=1)
        hint = f"did you mean '{close[0]}'? U" if close else "u"
        raise ConfigError(f"scheduler.type {kind!r} is not a scheduler DeepSpeed can build; {hint}se one of "
                          f"{', '.join(DEEPSPEED_SCHEDULERS)}, or the exact name of a torch.optim.lr_scheduler "
                          f"class such as StepLR")
    _check_against_signature("scheduler.params", params, torch_cls, f"torch.optim.lr_scheduler.{kind}")


def check_deepspeed_keys(ds_config: dict) -> None:
    """Reject DeepSpeed settings that are known to break Muon (docs/design.md §2).

    And the DeepSpeed keys DeepSpeed itself would refuse only after start-up: their value types,
    the optimizer and scheduler, named by dotted key."""
    for key in BATCH_KEYS + ("steps_per_print",):
        if key in ds_config:
            _check_kind(key, ds_config[key], "int")
    if "gradient_clipping" in ds_config:
        _check_kind("gradient_clipping", ds_config["gradient_clipping"], "number")
    zero = _object(ds_config, "zero_optimization") or {}
    stage = zero.get("stage", 0)
    if not (_is_int(stage) and 0 <= stage <= 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    check_optimizer(ds_config)
    check_scheduler(ds_config)
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() == "muon":
        clip = ds_config.get("gradient_clipping", 1.0)
        if clip not in (0, 0.0):
            raise ConfigError(f"gradient_clipping ({clip}) must be 0 with the Muon optimizer: DeepSpeed ZeRO divides "
                              f"every Muon update by its own norm when clipping is on (DeepSpeed issue #8439), "
                              f"which shrinks steps ~6x; set \"gradient_clipping\": 0")
        if stage == 3:
            raise ConfigError("zero_optimization.stage (3) is not supported with the Muon optimizer: streaming_muloco "
                              "handles Muon (its update scale, the outer loop on its shards) under ZeRO stages 0-2 "
                              "only; set \"zero_optimization\": {\"stage\": 2}, or 1")
        if zero.get("reduce_scatter") is True and stage in (1, 2):
            raise ConfigError("zero_optimization.reduce_scatter must be false with the Muon optimizer: DeepSpeed's "
                              "Muon gives rank-divergent updates with it; set \"reduce_scatter\": false")


def check_batch_keys(ds_config: dict, num_replicas: int, ranks_per_replica: int) -> None:
    """DeepSpeed's batch triple, against one replica's data-parallel group of D ranks.

    Each replica is its own DeepSpeed data-parallel group, so DeepSpeed checks
    train_batch_size == micro x accumulation x D, not x world size. DeepSpeed derives any one
    missing key (as in its `_set_batch_related_parameters`); this refuses what it would refuse,
    with the value that fits.
    """
    K, D = num_replicas, ranks_per_replica
    world = K * D
    train = ds_config.get("train_batch_size")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    for key, value in zip(BATCH_KEYS, (train, micro, accum)):
        if value is not None:
            _check_kind(key, value, "int")
            if value < 1:
                raise ConfigError(f"{key} ({value}) must be >= 1")
    if train is None and micro is None:
        raise ConfigError("train_micro_batch_size_per_gpu is missing (and so is train_batch_size): set "
                          "\"train_micro_batch_size_per_gpu\", the sequences per rank per micro-step")
    group = (f"each of the {K} replicas is its own DeepSpeed data-parallel group of D={D} ranks" if K > 1
             else f"the data-parallel group has D={D} ranks")
    if train is None:
        return  # DeepSpeed sets it to micro x accumulation x D
    if micro is not None and accum is not None:
        if train == micro * accum * D:
            return
        if K > 1 and train == micro * accum * world:
            raise ConfigError(f"train_batch_size ({train}) is the global batch micro ({micro}) x accumulation "
                              f"({accum}) x world size ({world}), but {group}, so DeepSpeed needs the batch of one "
                              f"replica: set \"train_batch_size\": {micro * accum * D} (= {micro} x {accum} x {D}), "
                              f"or leave it out and DeepSpeed derives it")
        raise ConfigError(f"train_batch_size ({train}) must equal train_micro_batch_size_per_gpu ({micro}) x "
                          f"gradient_accumulation_steps ({accum}) x D ({D}) = {micro * accum * D}: {group}; set "
                          f"\"train_batch_size\": {micro * accum * D}, or leave it out and DeepSpeed derives it")
    known, name = (micro, "train_micro_batch_size_per_gpu") if micro is not None else \
        (accum if accum is not None else 1, "gradient_accumulation_steps")
    if train % (known * D) != 0:
        what = f"{name} ({known})" if micro is not None or accum is not None else "D"
        hint = (f"; with the global batch ({train}) in mind, one replica's batch is {train // K}"
                if K > 1 and train % K == 0 else "")
        raise ConfigError(f"train_batch_size ({train}) must be a multiple of {what} x D ({D}) = {known * D}: "
                          f"{group}, and DeepSpeed derives the other batch key from it{hint}")


def split_config(ds_config: dict) -> tuple[dict, StreamingMuLoCoConfig]:
    """Split a full DeepSpeed config dict into (DeepSpeed's part, our parsed section)."""
    if not isinstance(ds_config, dict):
        raise ConfigError(f"the DeepSpeed config must be a JSON object ({{...}}), got {type(ds_config).__name__}")
    check_finite(ds_config)
    if SECTION in ds_config and ds_config[SECTION] is None:
        raise ConfigError(f"{SECTION} is null: for plain DeepSpeed data parallel remove the section, or write "
                          f"\"{SECTION}\": {{\"enabled\": false}}")
    ds = {k: v for k, v in ds_config.items() if k != SECTION}
    check_deepspeed_keys(ds)
    cfg = parse_section(ds_config.get(SECTION))
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if cfg.enabled and stage not in (1, 2):
        raise ConfigError(f"zero_optimization.stage ({stage}) must be 1 or 2 with the {SECTION} outer loop: it "
                          f"works on ZeRO's partitioned fp32 master weights; set \"zero_optimization\": "
                          f"{{\"stage\": 1}}")
    return ds, cfg


_WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def world_size_from_env() -> int:
    """The world size the launcher announced, read before any process group exists (1 when none)."""
    for var in _WORLD_SIZE_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"environment variable {var}={value!r} must be a positive integer (the number of "
                                  f"ranks); it is set by the launcher")
            return int(value)
    return 1


def resolve(ds_config: dict, world_size: int) -> tuple[dict, StreamingMuLoCoConfig, int, int]:
    """Everything checkable before process groups exist, for a DeepSpeed run of `world_size` ranks.

    Returns (DeepSpeed's config, our section, K, D).
    """
    ds, cfg = split_config(ds_config)
    K, D = cfg.topology(world_size) if cfg.enabled else (1, world_size)
    check_batch_keys(ds, K, D)
    params = (ds.get("scheduler") or {}).get("params") or {}
    if params.get("total_num_steps") == "auto":
        raise ConfigError("scheduler.params.total_num_steps is \"auto\", which only `python -m streaming_muloco.train` "
                          "fills in (with --steps); give the number of inner steps")
    return ds, cfg, K, D


class _JSONObject(dict):
    """A parsed JSON object that remembers the keys it held twice (json.loads keeps the last)."""

    duplicates: list[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _plain(node: Any, path: str, source: str) -> Any:
    """Plain dicts again, top down, so the first duplicate found is named by its full dotted path."""
    if isinstance(node, dict):
        for key in getattr(node, "duplicates", ()):
            raise ConfigError(f"{_join(path, key)} appears twice in {source}: JSON keeps only the last value, so "
                              f"the other is silently ignored; remove one of them")
        return {k: _plain(v, _join(path, k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, f"{path}[{i}]", source) for i, v in enumerate(node)]
    return node


def parse_json(text: str, source: str) -> dict:
    """A DeepSpeed JSON document: valid JSON, an object at the top, no key twice in one object."""
    try:
        raw = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a JSON object ({{\"train_micro_batch_size_per_gpu\": ..., ...}}) at "
                          f"the top level, got a {_json_type(raw)}; see ds_configs/ for working examples")
    return _plain(raw, "", source)


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_json(path: str | Path) -> dict:
    """The raw DeepSpeed JSON file; a missing file, bad JSON or a key given twice names the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds-config '{path}' does not exist; see ds_configs/ for working examples")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--ds-config '{path}' cannot be read: {e}") from None
    return parse_json(text, f"--ds-config '{path}'")


def load_config(path: str | Path) -> tuple[dict, StreamingMuLoCoConfig]:
    """Read a DeepSpeed JSON file and split it; errors name the file."""
    return split_config(read_json(path))


def to_dict(cfg: StreamingMuLoCoConfig) -> dict:
    return dataclasses.asdict(cfg)
