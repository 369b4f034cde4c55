"""Metrics: a no-op logger base, with TensorBoard behind it on the rank that logs.

Every rank can call `scalar` unconditionally; only the logging rank writes, so call sites
carry no `if rank == 0` noise.
"""
from __future__ import annotations

import os
from typing import Any


class MetricsLogger:
    """Discards everything; the base for ranks that do not log."""

    log_dir: str | None = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, value: str, step: int = 0) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(MetricsLogger):
    """Writes TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow to import

        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, value: str, step: int = 0) -> None:
        self.writer.add_text(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_dir(ds_config: dict[str, Any], default: str) -> str | None:
    """Where to write: DeepSpeed's own `tensorboard` block if enabled, else `default`.

    Reusing DeepSpeed's block keeps one place for users to say where logs go.
    """
    tb = ds_config.get("tensorboard") or {}
    if tb.get("enabled"):
        return os.path.join(tb.get("output_path") or default, tb.get("job_name") or "streaming_muloco")
    return default


def make_logger(log_dir: str | None, is_logging_rank: bool) -> MetricsLogger:
    if not is_logging_rank or not log_dir:
        return MetricsLogger()
    return TensorBoardLogger(log_dir)
