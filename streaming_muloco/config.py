"""The strict, typed `streaming_muloco` section of a DeepSpeed JSON config.

DeepSpeed's own keys stay DeepSpeed's: this module only reads our section (and a few
DeepSpeed keys whose combination with ours is known to be broken), and hands DeepSpeed the
config without our section. Every mistake raises `ConfigError` naming the dotted key and the
fix, before any process group is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
            raise ConfigError(f"{p}.num_replicas ({self.num_replicas}) must be >= 1")
        if self.ranks_per_replica < 0:
            raise ConfigError(f"{p}.ranks_per_replica ({self.ranks_per_replica}) must be >= 1, or 0 to derive it")
        if self.sync_every < 1:
            raise ConfigError(f"{p}.sync_every ({self.sync_every}) must be >= 1 inner step")
        if self.num_fragments < 1:
            raise ConfigError(f"{p}.num_fragments ({self.num_fragments}) must be >= 1")
        if self.num_fragments > self.sync_every:
            raise ConfigError(f"{p}.num_fragments ({self.num_fragments}) must be <= sync_every ({self.sync_every}): "
                              f"each fragment needs its own start step")
        if self.sync_delay < 0:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be >= 0")
        if self.sync_delay >= self.sync_every / self.num_fragments:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be < sync_every/num_fragments "
                              f"({self.sync_every / self.num_fragments:g}): a fragment must finish before the next "
                              f"one starts; lower sync_delay or num_fragments")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise ConfigError(f"{p}.mix_alpha ({self.mix_alpha}) must be in [0, 1]")
        if self.outer_lr <= 0:
            raise ConfigError(f"{p}.outer_lr ({self.outer_lr}) must be > 0")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"{p}.outer_momentum ({self.outer_momentum}) must be in [0, 1)")
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
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
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
    """Parse and validate the `streaming_muloco` section; None means plain data parallel."""
    cfg = StreamingMuLoCoConfig(enabled=False) if raw is None else _from_dict(StreamingMuLoCoConfig, raw, SECTION)
    cfg.validate()
    return cfg


def check_deepspeed_keys(ds_config: dict) -> None:
    """Reject DeepSpeed settings that are known to break Muon (docs/design.md §2)."""
    opt = ds_config.get("optimizer", {})
    if isinstance(opt, dict) and str(opt.get("type", "")).lower() == "muon":
        clip = ds_config.get("gradient_clipping", 1.0)
        if clip not in (0, 0.0):
            raise ConfigError(f"gradient_clipping ({clip}) must be 0 with the Muon optimizer: DeepSpeed ZeRO divides "
                              f"every Muon update by its own norm when clipping is on (DeepSpeed issue #8439), "
                              f"which shrinks steps ~6x; set \"gradient_clipping\": 0")
        zero = ds_config.get("zero_optimization", {})
        if isinstance(zero, dict) and zero.get("reduce_scatter") is True and zero.get("stage", 0) in (1, 2):
            raise ConfigError("zero_optimization.reduce_scatter must be false with the Muon optimizer: DeepSpeed's "
                              "Muon gives rank-divergent updates with it; set \"reduce_scatter\": false")


def split_config(ds_config: dict) -> tuple[dict, StreamingMuLoCoConfig]:
    """Split a full DeepSpeed config dict into (DeepSpeed's part, our parsed section)."""
    if not isinstance(ds_config, dict):
        raise ConfigError("the DeepSpeed config must be a JSON object")
    ds = {k: v for k, v in ds_config.items() if k != SECTION}
    check_deepspeed_keys(ds)
    cfg = parse_section(ds_config.get(SECTION))
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if cfg.enabled and stage not in (1, 2):
        raise ConfigError(f"zero_optimization.stage ({stage}) must be 1 or 2 with the {SECTION} outer loop: it "
                          f"works on ZeRO's partitioned fp32 master weights; set \"zero_optimization\": "
                          f"{{\"stage\": 1}}")
    return ds, cfg


def read_json(path: str | Path) -> dict:
    """The raw DeepSpeed JSON file; a missing file or bad JSON names the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds-config '{path}' does not exist; see ds_configs/ for working examples")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds-config '{path}' is not valid JSON: {e}") from None


def load_config(path: str | Path) -> tuple[dict, StreamingMuLoCoConfig]:
    """Read a DeepSpeed JSON file and split it; errors name the file."""
    return split_config(read_json(path))


def to_dict(cfg: StreamingMuLoCoConfig) -> dict:
    return dataclasses.asdict(cfg)
