"""Atomic, durable, verified checkpoint directories: layout, commit, manifest, retention.

This module knows directories and files, never what is in them. The engine hands it a
`fingerprint` (what must not change across a resume) and a `write(directory)` / `read(directory)`
pair that puts its own files in a directory or restores from one. Layout under the checkpoint
directory (train.py uses `<out_dir>/checkpoints/`):

    step120/manifest.json   step, the engine's fingerprint, sha256 of every file
    step120/...             whatever the engine's `write` put there
    latest                  the name of the newest complete checkpoint

Commit protocol. Every rank writes under `step120.tmp/` (each file fsync'ed as it is written);
then rank 0 hashes the files, writes the manifest, fsyncs every directory, renames the
directory to `step120`, fsyncs the parent, and repoints `latest` the same way (write, fsync,
rename, fsync). A crash at any point leaves the previous checkpoint as `latest`; a directory
without `manifest.json` is never a checkpoint.

Errors are agreed on: after each phase every rank learns every rank's outcome (one
all_gather), so a rank that cannot write (EACCES, ENOSPC, EROFS) makes every rank raise the same
CheckpointError instead of leaving the others blocked in a barrier until they report a dead peer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
import torch.distributed as dist

from .errors import CheckpointError

log = logging.getLogger("streaming_muloco")

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---- durable writes -----------------------------------------------------------------------
def torch_save(obj: Any, path: str | Path, **kwargs: Any) -> None:
    """`torch.save` through a Python file, flushed and fsync'ed.

    Through a file object a full disk surfaces as `OSError(ENOSPC)` with its errno; given a
    path, torch reports only "unexpected pos" from its C++ writer.
    """
    try:
        with open(path, "wb") as f:
            torch.save(obj, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)  # a failed write() names no file; the message should
        raise


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror_text(e: OSError) -> str:
    """'[Errno 28] No space left on device' plus the file, without Python's repr quoting."""
    text = f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno or 0)}" if e.errno else str(e)
    return f"{text} (at '{e.filename}')" if e.filename else text


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---- pre-flight ---------------------------------------------------------------------------
def preflight(directory: str | Path, nbytes: int, detail: str = "") -> None:
    """Fail now, not after hours of training: `directory` must be writable and hold `nbytes`.

    Per process and before any process group exists, so it needs no collective: every rank
    checks the same thing and raises the same error. Writes and removes one small probe file.
    """
    d = Path(directory)
    probe = d / f".preflight-{socket.gethostname()}-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        free = shutil.disk_usage(d).free
    except OSError as e:
        raise CheckpointError(f"checkpoint directory '{d}' is not writable: {_oserror_text(e)}; choose a writable "
                              f"--out-dir, fix its permissions, or pass --no-save") from None
    if free < nbytes:
        why = f" ({detail})" if detail else ""
        raise CheckpointError(f"checkpoint directory '{d}' has {_fmt_bytes(free)} free but one checkpoint of this run "
                              f"needs about {_fmt_bytes(nbytes)}{why}; make room, choose another --out-dir, or pass "
                              f"--no-save")


# ---- agreement across ranks ---------------------------------------------------------------
def _agree(exc: BaseException | None) -> None:
    """Collective: every rank learns every rank's outcome of a phase; all fail alike.

    A CheckpointError on any rank becomes the same CheckpointError on every rank (the lowest
    failing rank's). Anything else is a bug: the rank that hit it re-raises it with its
    traceback, the others stop with a RuntimeError pointing at it.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if exc is not None:
            raise exc
        return
    mine = None if exc is None else (
        ("user", str(exc)) if isinstance(exc, CheckpointError) else ("bug", f"{type(exc).__name__}: {exc}"))
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    user = [o[1] for _, o in failed if o[0] == "user"]
    if user:
        raise CheckpointError(user[0])
    if exc is not None:
        raise exc
    rank, (_, text) = failed[0]
    raise RuntimeError(f"rank {rank} failed while handling a checkpoint ({text}); see its traceback")


def _write_error(step: int, root: Path, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint step{step} into '{root}' (rank {dist.get_rank()}): "
                           f"{_oserror_text(e)}; make room or fix the directory's permissions (or choose another "
                           f"--out-dir), then continue with --resume: the last complete checkpoint is untouched")


# ---- save ---------------------------------------------------------------------------------
def save(save_dir: str | Path, step: int, fingerprint: Mapping[str, Any],
         write: Callable[[Path], list[Path]], keep_last: int = 0) -> Path:
    """Collective: every rank calls it at the same step. Returns the committed `save_dir/step{N}`.

    `write(directory)` puts this rank's files under `directory` (through `torch_save`, so each
    is fsync'ed) and returns their paths. `keep_last` > 0 deletes older complete checkpoints
    after the commit, keeping this one and the `keep_last - 1` newest before it.
    """
    root = Path(save_dir)
    final, tmp = root / f"step{step}", root / f"step{step}.tmp"
    rank = dist.get_rank()
    exc: BaseException | None = None
    if rank == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # leftovers of a crash during an earlier save
            tmp.mkdir(parents=True)
        except OSError as e:
            exc = _write_error(step, root, e)
        except Exception as e:  # noqa: BLE001 - rank 0 alone, no collective inside: safe to agree on
            exc = e
    _agree(exc)
    exc = None
    # Only errors raised once this rank's collectives inside `write` are done are agreed on
    # (OSError, CheckpointError: the engine holds back DeepSpeed's write errors until its
    # barriers have run). Anything else may come from a collective itself (a dead peer):
    # agreeing would mean one more collective with that peer, so it propagates as it is.
    try:
        written = write(tmp)
        for d in sorted({p.parent for p in written}):
            fsync_dir(d)
    except OSError as e:
        exc = _write_error(step, root, e)
    except CheckpointError as e:
        exc = e
    _agree(exc)
    exc = None
    if rank == 0:
        try:
            _commit(root, tmp, final, step, fingerprint)
        except OSError as e:
            exc = _write_error(step, root, e)
        except Exception as e:  # noqa: BLE001 - rank 0 alone, no collective inside: safe to agree on
            exc = e
    _agree(exc)
    if rank == 0 and keep_last > 0:
        _prune(root, step, keep_last)
    return final


def _commit(root: Path, tmp: Path, final: Path, step: int, fingerprint: Mapping[str, Any]) -> None:
    """Rank 0: manifest, fsync everything, rename into place, repoint `latest`."""
    # Every rank fsync'ed what it wrote; this also covers files written by other means
    # (DeepSpeed's recovery scripts), and costs nothing for files already on disk.
    files = {str(p.relative_to(tmp)): _sha256(p, fsync=True) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"step": step, "fingerprint": _jsonable(fingerprint), "files": files}
    write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(tmp)
    # Re-saving a step (a run resumed from an earlier checkpoint): move the old one aside
    # first, so that no instant has two directories competing for the name.
    replaced = root / f"{final.name}.replaced"
    if replaced.exists():
        shutil.rmtree(replaced)
    if final.exists():
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(root)
    latest_tmp = root / f"{LATEST}.tmp"
    write_text(latest_tmp, final.name)
    os.replace(latest_tmp, root / LATEST)
    fsync_dir(root)
    if replaced.exists():
        shutil.rmtree(replaced, ignore_errors=True)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Delete complete checkpoints older than `step` beyond the newest `keep_last - 1`.

    Never the one `latest` names (this step), never anything newer (a resumed run that went
    back leaves those alone), never an incomplete directory. Each victim is renamed out of
    the `step{N}` namespace before it is removed, so a crash mid-delete leaves no half
    checkpoint that looks complete. A failure to delete is a warning: the commit stands.
    """
    latest = (root / LATEST).read_text().strip()
    older = sorted((int(m[1]), p) for p in root.iterdir()
                   if (m := _STEP_DIR.fullmatch(p.name)) and int(m[1]) < step and p.name != latest
                   and (p / MANIFEST).is_file())
    doomed = [p for _, p in older[:max(0, len(older) - (keep_last - 1))]]
    doomed += [p for p in root.glob("step*.deleting") if p.is_dir()]  # an earlier prune that crashed
    for p in doomed:
        try:
            if not p.name.endswith(".deleting"):
                gone = p.with_name(p.name + ".deleting")
                os.replace(p, gone)
                p = gone
            shutil.rmtree(p)
        except OSError as e:
            log.warning("--keep-last: could not delete old checkpoint '%s': %s", p, _oserror_text(e))


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """What `value` reads back as from JSON (tuples become lists), for exact comparison."""
    return json.loads(json.dumps(value))


# ---- find, verify, load -------------------------------------------------------------------
def find_latest(save_dir: str | Path) -> Path | None:
    """The checkpoint `save_dir/latest` names; None when there is no `latest` file."""
    root = Path(save_dir)
    latest = root / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    path = root / name
    if not name or not (path / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint '{path}' named by '{latest}' is missing or incomplete (no {MANIFEST}); "
                              f"point --resume at another step directory in '{root}', or delete '{latest}' to "
                              f"start over")
    return path


def _complete_steps(root: Path) -> list[str]:
    """Names of the complete checkpoints (step dirs with a manifest) in `root`, oldest first."""
    steps = [(int(m[1]), p.name) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file()]
    return [name for _, name in sorted(steps)]


def locate(path: str | Path) -> Path | None:
    """The checkpoint `path` means: a step directory, or a checkpoints directory's `latest`.

    None: nothing has been saved there yet (no such directory, or an empty one). A step
    directory without its manifest, or a checkpoints directory with complete checkpoints but
    no `latest`, is an error: starting over there would silently discard training.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file():
        return find_latest(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path '{path}' is a file; give a step directory (.../checkpoints/step600) "
                              f"or the checkpoints directory that holds '{LATEST}'")
    if _STEP_DIR.fullmatch(path.name) or path.name.endswith(".tmp") or any(path.glob("replica*")):
        siblings = _complete_steps(path.parent)
        newest = f": the newest next to it is '{path.parent / siblings[-1]}'" if siblings else ""
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST}: it is incomplete (the save that wrote it did "
                              f"not finish) or was not written by streaming_muloco; resume from a complete "
                              f"checkpoint{newest}")
    steps = _complete_steps(path)
    if steps:
        raise CheckpointError(f"checkpoint directory '{path}' has no '{LATEST}' file but holds complete checkpoints "
                              f"({', '.join(steps)}); resume from one explicitly, e.g. --resume {path / steps[-1]}")
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of step directory `path`, checked for shape; errors name the file."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no {MANIFEST}: it is incomplete or was not written by "
                              f"streaming_muloco") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint manifest '{mpath}' is corrupt (not valid JSON)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint manifest '{mpath}': {_oserror_text(e)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint manifest '{mpath}' is malformed: {problem}; the checkpoint is damaged or "
                              f"was not written by streaming_muloco; resume from another checkpoint")
    return manifest


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return f"expected a JSON object, found {type(m).__name__}"
    for key, tp, name in (("step", int, "an integer"), ("fingerprint", dict, "an object"), ("files", dict, "an object")):
        if key not in m:
            return f"the key '{key}' is missing"
        if not isinstance(m[key], tp) or isinstance(m[key], bool):
            return f"'{key}' must be {name}, found {json.dumps(m[key])[:60]}"
    if m["step"] < 1:
        return f"'step' must be >= 1, found {m['step']}"
    for rel, digest in m["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"file entry '{rel}' points outside the checkpoint"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"file entry '{rel}' has no sha256 digest ({json.dumps(digest)[:60]})"
    return None


@dataclass
class Loaded:
    """What `load` restored: the step, the step directory, and the accepted fingerprint changes."""

    step: int
    path: Path
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def verify(path: Path, expected: Mapping[str, Any], may_change: Collection[str] = (),
           hints: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Check the manifest, the fingerprint, then every file's checksum.

    Returns (manifest, {key: (saved, now)} for the `may_change` keys that differ). The
    fingerprint comes first: a changed setting is found without hashing gigabytes.
    """
    manifest = read_manifest(path)
    saved, changed = manifest["fingerprint"], {}
    for key, value in _jsonable(dict(expected)).items():
        if key not in saved:
            raise CheckpointError(f"cannot resume from '{path}': its manifest does not record {key} (an older "
                                  f"streaming_muloco wrote it); start a new run in another --out-dir")
        if saved[key] == value:
            continue
        if key in may_change:
            changed[key] = (saved[key], value)
            continue
        fix = (hints or {}).get(key, "resume with the original setting or start a new run in another --out-dir")
        raise CheckpointError(f"cannot resume from '{path}': it was saved with {key}={json.dumps(saved[key])} but "
                              f"this run has {key}={json.dumps(value)}; {fix}")
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file '{f}' is corrupt or truncated (sha256 mismatch)")
    return manifest, changed


def load(path: str | Path, fingerprint: Mapping[str, Any], read: Callable[[Path], int],
         may_change: Collection[str] = (), hints: Mapping[str, str] | None = None,
         missing_ok: bool = False) -> Loaded | None:
    """Collective: find, verify and restore the checkpoint `path` means (see `locate`).

    Rank 0 finds and verifies (one reader of every byte); every rank gets its verdict, so a bad
    checkpoint raises the same CheckpointError everywhere. `read(step_dir)` restores this
    rank's state and returns the step it holds. None when `missing_ok` and nothing was saved.
    """
    path = Path(path)
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            found = locate(path)
            if found is None and not missing_ok:
                raise CheckpointError(f"checkpoint path '{path}' does not exist" if not path.exists() else
                                      f"no checkpoint in '{path}': it has neither {MANIFEST} (a step directory) nor "
                                      f"a '{LATEST}' file (a checkpoints directory)")
            if found is None:
                verdict[0] = ("none",)
            else:
                manifest, changed = verify(found, fingerprint, may_change, hints)
                verdict[0] = ("ok", str(found), manifest["step"], changed)
        except CheckpointError as e:
            verdict[0] = ("error", str(e))
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0][0] == "error":
        raise CheckpointError(verdict[0][1])
    if verdict[0][0] == "none":
        return None
    _, found_s, step, changed = verdict[0]
    found = Path(found_s)
    exc: BaseException | None = None
    try:
        got = read(found)
        if got != step:
            raise CheckpointError(f"checkpoint '{found}' is inconsistent: its manifest says step {step} but rank "
                                  f"{dist.get_rank()}'s state is at step {got}")
    except OSError as e:  # as in save: only errors that cannot come from a collective are agreed on
        exc = CheckpointError(f"cannot read checkpoint '{found}': {_oserror_text(e)}")
    except CheckpointError as e:
        exc = e
    _agree(exc)
    return Loaded(step, found, changed)


__all__ = ["MANIFEST", "LATEST", "Loaded", "CheckpointError", "preflight", "save", "load", "locate", "verify",
           "read_manifest", "find_latest", "torch_save", "fsync_dir"]
