"""streaming_muloco: communication-efficient DiLoCo / MuLoCo / Streaming DiLoCo on DeepSpeed.

Nothing is imported eagerly beyond the config: importing the package starts no process
group and does not import DeepSpeed.
"""
from .config import StreamingMuLoCoConfig
from .errors import ConfigError, UserError
from .process_exit import exit_process

__version__ = "0.1.0"


def initialize(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards to engine.initialize
    """See `streaming_muloco.engine.initialize`."""
    from .engine import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["initialize", "exit_process", "UserError", "ConfigError", "StreamingMuLoCoConfig", "__version__"]
