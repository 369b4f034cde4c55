"""The strict, typed `streaming_muloco` section of a DeepSpeed JSON config, and reading the JSON.

DeepSpeed's own keys stay DeepSpeed's: this module reads our section strictly, has
`ds_checks.py` check what DeepSpeed itself would refuse late or get wrong silently, and hands
DeepSpeed the config without our section. Every mistake raises `ConfigError` naming the dotted
key and the fix, before any process group is built. This is the one place where a value is checked against the key it came from: the
algorithm modules (schedule, fragments, outer optimizer) raise plain ValueErrors about their
own arguments, and everything they would refuse is refused here first.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .ds_checks import check_batch_keys, check_deepspeed_keys, check_finite, join_key, non_finite_error, quoted_number_hint
from .errors import ConfigError

SECTION = "streaming_muloco"


@dataclass(frozen=True)
class CompressionConfig:
    """How pseudo-gradients are compressed on the wire (docs/design.md §1 and §5)."""

    method: Literal["none", "linear", "statistical", "e3m0", "topk", "sparse"] = "none"
    bits: int = 8
    block_size: int = 256
    topk_fraction: float = 0.01
    error_feedback: bool = True
    ef_beta: float = 1.0
    # The official MuLoCo code feeds outer_lr * pseudo_grad into the EF buffer, so its
    # effective outer lr is outer_lr squared; true reproduces that.
    ef_scale_by_outer_lr: bool = False
    collective: Literal["single_phase", "two_phase"] = "single_phase"
    # Parameter-aware compression (segments.py): "row" quantizes each parameter row by row,
    # "block" in blocks inside each parameter, "flat" in blocks of the whole flat shard.
    granularity: Literal["row", "block", "flat"] = "flat"
    stat_clip: float = 6.0  # "statistical": bins span mean ± stat_clip·σ (MuLoCo's code: 6)
    compress_vectors: bool = False  # norms and biases: fp32 on the wire unless true
    compress_embedding: bool = True
    compress_head: bool = True
    # Compress in a worker thread while training goes on; the launch follows in start order.
    # Single-phase exchanges of a single job; two-phase and fault-tolerant runs stay inline.
    background: bool = True

    def validate(self, prefix: str) -> None:
        if self.granularity != "flat" and self.method == "topk":
            raise ConfigError(f"{prefix}.granularity ({self.granularity!r}) needs a block method (linear, "
                              f"statistical, e3m0, sparse); whole-shard top-k has no blocks: set granularity "
                              f"to \"flat\" or use method \"sparse\" (top-k per block)")
        if self.method in ("linear", "statistical") and self.bits not in (2, 4, 8):
            raise ConfigError(f"{prefix}.bits ({self.bits}) must be 2, 4 or 8 for method '{self.method}'")
        if self.method == "sparse" and self.bits != 2:
            raise ConfigError(f"{prefix}.bits ({self.bits}) must be 2 for method 'sparse' (sign + magnitude "
                              f"bit per kept value)")
        if self.method == "e3m0" and self.bits != 4:
            raise ConfigError(f"{prefix}.bits ({self.bits}) must be 4 for method 'e3m0' (4-bit floats)")
        if self.block_size < 1:
            raise ConfigError(f"{prefix}.block_size ({self.block_size}) must be >= 1")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ConfigError(f"{prefix}.topk_fraction ({self.topk_fraction}) must be in (0, 1]")
        if not (math.isfinite(self.stat_clip) and self.stat_clip > 0):
            raise ConfigError(f"{prefix}.stat_clip ({self.stat_clip}) must be a positive number of standard "
                              f"deviations (the statistical bins span mean ± stat_clip·σ; MuLoCo's code uses 6)")
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
class FaultToleranceConfig:
    """Replicas as independent jobs that meet through a torchft Lighthouse (docs/design.md §6).

    `replica_id` and `lighthouse` are normally given on the command line (--replica-id,
    --lighthouse), which also sets `enabled`.
    """

    enabled: bool = False
    replica_id: int = -1  # k in [0, num_replicas); names the job and its data stream
    lighthouse: str = ""  # HOST:PORT of `python -m streaming_muloco.lighthouse`
    min_replicas: int = 1  # a sync needs at least this many replicas in its quorum
    timeout_s: float = 60.0  # a cross-replica collective, commit vote or state transfer
    quorum_timeout_s: float = 300.0  # waiting for a quorum of min_replicas (a joiner waits for the next sync)

    def validate(self, prefix: str) -> None:
        if self.min_replicas < 1:
            raise ConfigError(f"{prefix}.min_replicas ({self.min_replicas}) must be >= 1")
        for key in ("timeout_s", "quorum_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} ({getattr(self, key)}) must be > 0 seconds")


@dataclass(frozen=True)
class InnerConfig:
    """Options on top of DeepSpeed's inner optimizer."""

    # "deepspeed": DeepSpeed Muon's own scale sqrt(max(1, rows/cols)).
    # "moonlight": 0.2*sqrt(max(rows, cols)), which matches AdamW's update RMS (Moonlight).
    muon_update_scale: Literal["deepspeed", "moonlight"] = "deepspeed"
    # Regexes (re.search on parameter names) of parameters that get AdamW whatever their shape;
    # the default split by module is in param_roles.py (docs/design.md §2).
    adamw_params: tuple[str, ...] = ()

    def validate(self, prefix: str) -> None:
        for i, pat in enumerate(self.adamw_params):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"{prefix}.adamw_params[{i}] ({pat!r}) is not a valid regular expression: {e}; "
                                  f"write a Python regex matched with re.search against parameter names, "
                                  f"e.g. \"lm_head\\\\.weight$\"") from None


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
    # Eager updates (Kale et al., arXiv 2502.12996; docs/design.md §3): the outer step is taken
    # at the sync point with this replica's fresh pseudo-gradient standing in for its share of
    # the average, whose others' part arrives one round later; sync_delay may then reach H.
    eager_updates: bool = False
    fragment_strategy: Literal["strided", "sequential"] = "strided"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    nonfinite_policy: Literal["skip", "error"] = "skip"
    # Where theta_g, the outer momentum and EF residuals rest between syncs: the engine's device,
    # or pinned host memory ("cpu"; outer_state.py, docs/design.md §4).
    outer_state_device: Literal["accelerator", "cpu"] = "accelerator"
    inner: InnerConfig = field(default_factory=InnerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)

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
        if self.eager_updates:
            self._validate_eager()
        elif self.sync_delay >= self.sync_every / self.num_fragments:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be < sync_every/num_fragments "
                              f"({self.sync_every / self.num_fragments:g}): a fragment must finish before the next "
                              f"one starts; lower sync_delay or num_fragments, or set {p}.eager_updates to true "
                              f"(it allows up to sync_every)")
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
        self.fault_tolerance.validate(f"{p}.fault_tolerance")
        if self.fault_tolerance.enabled:
            self._validate_fault_tolerance()

    def _validate_eager(self) -> None:
        """Eager updates overlap up to a whole fragment period, and take the outer step at the sync
        point, so nothing is left to mix at the finish."""
        p = SECTION
        if self.sync_delay > self.sync_every:
            raise ConfigError(f"{p}.sync_delay ({self.sync_delay}) must be <= sync_every ({self.sync_every}) with "
                              f"{p}.eager_updates: a fragment's average must arrive by its next sync point")
        if self.mix_alpha != 0.0:
            raise ConfigError(f"{p}.mix_alpha ({self.mix_alpha}) must be 0 with {p}.eager_updates: the outer step "
                              f"is taken at the sync point, before any overlap step, so there is no local "
                              f"progress to mix in; remove mix_alpha or set eager_updates to false")
        if (self.compression.collective == "two_phase" and self.compression.method != "none"
                and self.sync_delay >= self.sync_every / self.num_fragments):
            raise ConfigError(f"{p}.compression.collective 'two_phase' with {p}.eager_updates needs sync_delay "
                              f"({self.sync_delay}) < sync_every/num_fragments "
                              f"({self.sync_every / self.num_fragments:g}): its second phase is launched when the "
                              f"first is seen complete, which keeps one order on every rank only while one "
                              f"fragment is in flight; use collective 'single_phase' or a lower sync_delay")
        if self.fault_tolerance.enabled:
            raise ConfigError(f"{p}.eager_updates does not work with {p}.fault_tolerance.enabled yet: a replica's "
                              f"outer params hold its own eager term, so a joiner cannot copy a peer's; set one "
                              f"of them to false")

    def _validate_fault_tolerance(self) -> None:
        p, ft = SECTION, self.fault_tolerance
        q = f"{p}.fault_tolerance"
        if not 0 <= ft.replica_id < self.num_replicas:
            raise ConfigError(f"{q}.replica_id ({ft.replica_id}) must be in [0, {p}.num_replicas = "
                              f"{self.num_replicas}); start each replica job with --replica-id k")
        import importlib.util

        if importlib.util.find_spec("torchft") is None:
            raise ConfigError(f"{q}.enabled needs the torchft package: pip install 'streaming_muloco[ft]' (or "
                              f"pip install torchft)")
        if not ft.lighthouse:
            raise ConfigError(f"{q}.lighthouse is not set: pass --lighthouse HOST:PORT, the address printed by "
                              f"`python -m streaming_muloco.lighthouse`")
        if ft.min_replicas > self.num_replicas:
            raise ConfigError(f"{q}.min_replicas ({ft.min_replicas}) must be <= {p}.num_replicas "
                              f"({self.num_replicas})")
        if self.comm.backend != "torch":
            raise ConfigError(f"{p}.comm.backend ('{self.comm.backend}') cannot change membership, which "
                              f"{q}.enabled needs: use \"torch\" (the replicas' collectives then run on torchft's "
                              f"reconfigurable process groups)")

    def topology(self, world_size: int) -> tuple[int, int]:
        """(K, D) for this world size, or a ConfigError that prints every factor.

        With fault tolerance each job is one replica, so D is the job's world size.
        """
        K = self.num_replicas
        if self.fault_tolerance.enabled:
            if self.ranks_per_replica not in (0, world_size):
                raise ConfigError(f"{SECTION}.ranks_per_replica ({self.ranks_per_replica}) must equal the ranks of "
                                  f"this replica job ({world_size}) with fault_tolerance: each job is one replica")
            return K, world_size
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
            raise ConfigError(f"{key} must be an integer, got {value!r}{quoted_number_hint(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}{quoted_number_hint(value)}")
        if not math.isfinite(value):
            raise non_finite_error(key, value)
        return float(value)
    if origin is tuple:  # tuple[X, ...]: a JSON list (frozen dataclasses hold tuples)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
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
    if cfg.enabled and stage not in (1, 2, 3):
        raise ConfigError(f"zero_optimization.stage ({stage}) must be 1, 2 or 3 with the {SECTION} outer loop: it "
                          f"works on ZeRO's partitioned fp32 master weights; set \"zero_optimization\": "
                          f"{{\"stage\": 1}}")
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer")
    if cfg.enabled and isinstance(offload, dict) and offload.get("device") == "nvme":
        raise ConfigError(f"zero_optimization.offload_optimizer.device 'nvme' cannot be used with the {SECTION} outer "
                          f"loop: the fp32 master partitions it reads and writes at every sync are swapped out to "
                          f"disk; use \"cpu\" or \"none\"")
    opt_type = str((ds.get("optimizer") or {}).get("type", ""))
    if cfg.inner.adamw_params and opt_type.lower() != "muon":
        raise ConfigError(f"{SECTION}.inner.adamw_params chooses which parameters Muon leaves to AdamW, but "
                          f"optimizer.type is '{opt_type or '(none)'}', not 'Muon'; remove the key or use Muon")
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
            raise ConfigError(f"{join_key(path, key)} appears twice in {source}: JSON keeps only the last value, so "
                              f"the other is silently ignored; remove one of them")
        return {k: _plain(v, join_key(path, k), source) for k, v in node.items()}
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
