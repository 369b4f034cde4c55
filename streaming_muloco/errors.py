"""The errors a user acts on, and nothing else.

`train.main` catches `UserError` and prints exactly one `error: ...` line per job, no
traceback, exit code `exit_code`. Every other exception is a bug (or a library's failure) and
keeps its traceback. Components deeper down raise plain `ValueError`s about their own
arguments; the boundary that knows which user input produced the value (the config parser,
the CLI, the data loader, the checkpoint reader) turns them into one of these, naming the
key, argument or file and the fix.
"""
from __future__ import annotations


class UserError(Exception):
    """Base: something the user must fix or decide; the message says what and how."""

    exit_code = 2


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


class PeerFailureError(UserError):
    """A collective failed because a peer rank died or hangs; restart with --resume."""

    exit_code = 1
