"""Checks of DeepSpeed's own config keys, before DeepSpeed starts.

DeepSpeed's keys stay DeepSpeed's: nothing here changes them. It refuses what DeepSpeed itself
would reject late (after process groups and the model exist, with a traceback) or silently get
wrong: non-finite numbers, the optimizer and scheduler types and the types of their params,
the batch keys against each replica's data-parallel size, and combinations known to break
Muon (docs/design.md §2). Every refusal is a `ConfigError` naming the dotted key and the fix.
"""
from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Callable

from .errors import ConfigError


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


def quoted_number_hint(value: Any) -> str:
    """'0.02' in quotes is a JSON string; say so, since the two look alike in a config file."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (a JSON string: write {value.strip()} without quotes)"
    return ""


def non_finite_error(key: str, value: float) -> ConfigError:
    shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return ConfigError(f"{key} is {shown}: only finite numbers are accepted (NaN and Infinity are not standard "
                       f"JSON, and no setting means them); give a finite number")


def _check_kind(key: str, value: Any, kind: str) -> None:
    ok, what = _KINDS[kind]
    if not ok(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}{quoted_number_hint(value)}")


def _unknown_key(key: str, name: str, known: typing.Iterable[str], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"{key} is not a parameter of {what}; {hint}")


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_finite(node: Any, path: str = "") -> None:
    """Refuse NaN/Infinity anywhere (Python's json reads them; no DeepSpeed or outer-loop key means them)."""
    if isinstance(node, float) and not math.isfinite(node):
        raise non_finite_error(path or "the config", node)
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, join_key(path, str(key)))
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
        if clip not in (0, 0.0) and stage not in (1, 2, 3):
            raise ConfigError(f"gradient_clipping ({clip}) with the Muon optimizer needs zero_optimization.stage 1, "
                              f"2 or 3 (got {stage}): streaming_muloco clips the raw gradient before Muon there; set "
                              f"\"zero_optimization\": {{\"stage\": 1}}, or \"gradient_clipping\": 0")
        offload = zero.get("offload_optimizer")
        if clip not in (0, 0.0) and isinstance(offload, dict) and offload.get("device", "none") not in ("none", None):
            raise ConfigError(f"gradient_clipping ({clip}) with the Muon optimizer cannot be combined with "
                              f"zero_optimization.offload_optimizer: DeepSpeed then applies Muon inside step(), "
                              f"after its clipping of the orthogonalised update; set \"gradient_clipping\": 0 or "
                              f"remove offload_optimizer")
        if stage == 3 and zero.get("reduce_scatter", True) is not False:
            raise ConfigError("zero_optimization.reduce_scatter must be false with the Muon optimizer on ZeRO stage 3 "
                              "(it defaults to true, and DeepSpeed refuses Muon with it); set \"zero_optimization\": "
                              "{\"stage\": 3, \"reduce_scatter\": false}")
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
