"""The errors a user acts on, and how one of them is printed: once per job (docs/design.md §6).

`train.main` catches `UserError` and prints exactly one `error: ...` line per job, no
traceback, exit code `exit_code`. Every other exception is a bug (or a library's failure) and
keeps its traceback. Components deeper down raise plain `ValueError`s about their own
arguments; the boundary that knows which user input produced the value (the config parser,
the CLI, the data loader, the checkpoint reader) turns them into one of these, naming the
key, argument or file and the fix.

Who prints (`report`):
- `every_rank = True` (the default): an error every rank raises the same way, such as a bad
  config, CLI argument or data file (every rank reads the same inputs before any process group
  exists) or a checkpoint verdict that rank 0 broadcasts. Rank 0 prints it at once and exits.
  Every other rank waits `EVERY_RANK_GRACE_S` first, because a launcher (mpirun, the deepspeed
  launcher, torchrun) kills the whole job as soon as one rank exits non-zero: a rank 1 that
  exited first would get rank 0 killed before it printed anything. If a rank is still alive
  after the wait, rank 0 did not fail the same way (say a data file that is missing on one node
  only), and that rank prints the error itself, prefixed `rank R:`.
- `every_rank = False`: an error only some ranks see (a NaN in one replica, a dead peer). The
  rank that raised it prints it at once, prefixed `rank R:` (unless the text already starts
  with `rank `). Pass `every_rank=False` to any UserError raised by some ranks only.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO

# How long ranks other than 0 wait before printing an every-rank error themselves. Ranks reach
# the same pre-flight error within a second or two of each other; the launcher needs well under
# a second (mpirun) or one poll (the deepspeed launcher, 1 s) to kill them once rank 0 exits.
EVERY_RANK_GRACE_S = 10.0

# The launchers' names for this process's global rank, read before any process group exists.
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


class UserError(Exception):
    """Base: something the user must fix or decide; the message says what and how."""

    exit_code = 2
    every_rank = True

    def __init__(self, *args: object, every_rank: bool | None = None) -> None:
        super().__init__(*args)
        if every_rank is not None:
            self.every_rank = every_rank


class ConfigError(UserError, ValueError):
    """A bad DeepSpeed JSON / `streaming_muloco` value or CLI argument; names the dotted key."""


class DataError(UserError, ValueError):
    """A data path or format problem (missing, empty, wrong dtype)."""


class HostfileError(UserError, ValueError):
    """A malformed DeepSpeed hostfile; names the line."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, unwritable, or does not match this run."""


class NonFiniteError(UserError):
    """A loss or pseudo-gradient held NaN/inf and `nonfinite_policy` is 'error'."""

    exit_code = 3
    every_rank = False


class PeerFailureError(UserError):
    """A collective failed because a peer rank died or hangs; restart with --resume."""

    exit_code = 1
    every_rank = False


def launch_rank() -> int:
    """This process's global rank as the launcher announced it (0 when run on its own)."""
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def report(e: UserError, rank: int | None = None, stream: TextIO | None = None,
           grace_s: float = EVERY_RANK_GRACE_S) -> None:
    """Print `e` as one `error: ...` line, from the rank that should print it (module docstring)."""
    rank = launch_rank() if rank is None else rank
    stream = sys.stderr if stream is None else stream
    text = " ".join(str(e).split("\n")).strip() or type(e).__name__
    if e.every_rank and rank == 0:
        print(f"error: {text}", file=stream, flush=True)
        return
    if e.every_rank:
        # Rank 0 raises the same error and prints it; the launcher then kills this process
        # during the wait. Still alive afterwards means rank 0 did not: say it from here.
        time.sleep(grace_s)
    prefix = "" if text.startswith("rank ") else f"rank {rank}: "
    print(f"error: {prefix}{text}", file=stream, flush=True)
