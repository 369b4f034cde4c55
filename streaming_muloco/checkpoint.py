"""Atomic, verified checkpoints of the whole training state, and exact resume.

Layout under the checkpoint directory (train.py uses `<out_dir>/checkpoints/`):

    step120/manifest.json            topology + config fingerprint + sha256 of every file
    step120/replica0/...             DeepSpeed's own checkpoint of replica 0 (module, ZeRO optimizer
                                     partitions, LR scheduler), tag "replica0"
    step120/replica0/rank_state1.pt  ours, per rank: outer state (theta_g, outer momentum, error
                                     feedback, fragments in flight), inner step count, RNG states
    latest                           the name of the newest complete checkpoint

Everything is written under `step120.tmp/` and renamed once every rank has finished, so a crash
mid-save leaves the previous checkpoint as `latest`. Each replica is its own DeepSpeed
data-parallel group, so each gets its own DeepSpeed directory (their file names would collide).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import CheckpointError

MANIFEST = "manifest.json"


def fingerprint(engine: Any) -> dict[str, Any]:
    """What must not change across a resume: the shapes of sharded and per-fragment state."""
    cfg = engine.cfg
    return {"world_size": engine.topo.world_size, "num_replicas": engine.topo.num_replicas,
            "ranks_per_replica": engine.topo.ranks_per_replica,
            "num_fragments": cfg.num_fragments if cfg.enabled else 1,
            "outer_loop": cfg.enabled,
            "compression": {"method": cfg.compression.method, "bits": cfg.compression.bits,
                            "block_size": cfg.compression.block_size,
                            "topk_fraction": cfg.compression.topk_fraction,
                            "collective": cfg.compression.collective} if cfg.enabled else None,
            "zero_stage": engine.zero_optimization_stage()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine: Any, save_dir: str | Path, step: int) -> Path:
    """Collective: every rank calls it at the same step. Returns the final checkpoint path."""
    root = Path(save_dir)
    final, tmp = root / f"step{step}", root / f"step{step}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    tag = f"replica{engine.replica_id}"
    engine.engine.save_checkpoint(str(tmp), tag=tag, client_state={"inner_steps": engine.inner_steps},
                                  save_latest=False)
    state = {"inner_steps": engine.inner_steps, "rng": _rng_state(),
             "outer": engine.outer.state_dict() if engine.outer is not None else None}
    torch.save(state, tmp / tag / f"rank_state{engine.shard_id}.pt")
    dist.barrier()
    if rank == 0:
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"step": step, "fingerprint": fingerprint(engine), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
    dist.barrier()
    return final


def find_latest(save_dir: str | Path) -> Path | None:
    root = Path(save_dir)
    latest = root / "latest"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' named by '{latest}' is missing; delete '{latest}' to start "
                              f"over or point --resume at another checkpoint directory")
    return path


def verify(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Check the manifest, every file's checksum and the fingerprint; returns the manifest."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST}: it is incomplete or not ours")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint manifest '{mpath}' is corrupt (not valid JSON)") from None
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file '{f}' is corrupt or truncated (sha256 mismatch)")
    saved = manifest["fingerprint"]
    for key, value in expected.items():
        if saved.get(key) != value:
            raise CheckpointError(f"cannot resume from '{path}': it was saved with {key}={saved.get(key)} but this "
                                  f"run has {key}={value}; resume with the original setting or start a new run "
                                  f"in another --out-dir")
    return manifest


def load(engine: Any, path: Path) -> int:
    """Collective: restore every rank's state from `path`; returns the inner step to resume after."""
    # One rank reads and hashes everything; the others learn the verdict.
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            verdict[0] = verify(path, fingerprint(engine))
        except CheckpointError as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(verdict[0])
    manifest = verdict[0]
    tag = f"replica{engine.replica_id}"
    load_path, _ = engine.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{path / tag}'")
    state = torch.load(path / tag / f"rank_state{engine.shard_id}.pt", weights_only=False)
    engine.inner_steps = state["inner_steps"]
    if engine.outer is not None:
        engine.outer.load_state_dict(state["outer"])
    _set_rng_state(state["rng"])
    if engine.inner_steps != manifest["step"]:
        raise CheckpointError(f"checkpoint '{path}' is inconsistent: manifest step {manifest['step']} but rank "
                              f"state step {engine.inner_steps}")
    dist.barrier()
    return engine.inner_steps
