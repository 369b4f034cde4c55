"""Token data: the bundled corpus, user text or a memory-mapped token file, and batches.

Batches are a pure function of (seed, stream, step): no sampler state to checkpoint, so a
resumed run sees exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import DataError

BUNDLED_CORPUS = "shakespeare"
EVAL_STREAM = 1_000_003  # the data stream of held-out batches: no training rank uses it
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, tokens: np.ndarray | list[int]) -> str:
        return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def bundled_corpus_bytes() -> bytes:
    """The bundled Shakespeare text (public domain; see streaming_muloco/corpus/SOURCE.md)."""
    blob = resources.files("streaming_muloco").joinpath("corpus/shakespeare.txt.xz").read_bytes()
    return lzma.decompress(blob)


def load_tokens(path: str | None, dtype: str = "uint16", vocab_size: int = 256) -> np.ndarray:
    """Load a 1-D token array.

    - None or "shakespeare": the bundled corpus, byte-tokenized.
    - a `.txt` file: byte-tokenized (vocab 256).
    - anything else: a raw token file (nanoGPT `.bin` style) of `dtype`, memory-mapped so a
      corpus larger than RAM works.
    """
    if path is None or path == BUNDLED_CORPUS:
        return np.frombuffer(bundled_corpus_bytes(), dtype=np.uint8)
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data path '{path}' does not exist or is not a file; pass --data=<file.txt|file.bin> "
                        f"or --data={BUNDLED_CORPUS} for the bundled corpus")
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"data file '{path}' is empty (0 bytes); point --data at a non-empty .txt or token file, "
                        f"or use --data={BUNDLED_CORPUS}")
    if p.suffix == ".txt":
        if vocab_size < ByteTokenizer.vocab_size:
            raise DataError(f"a .txt corpus is byte-tokenized (256 symbols) but model.vocab_size is {vocab_size}")
        return np.frombuffer(_read(p, lambda: p.read_bytes()), dtype=np.uint8)
    if dtype not in _DTYPES:
        raise DataError(f"--data-dtype '{dtype}' is not supported; use one of {sorted(_DTYPES)}")
    np_dtype = _DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    if size % itemsize != 0:
        raise DataError(f"token file '{path}' has {size} bytes, not a multiple of {itemsize} ({dtype}); "
                        f"is --data-dtype right?")
    if np.iinfo(np_dtype).max + 1 < vocab_size:
        raise DataError(f"--data-dtype {dtype} holds at most {np.iinfo(np_dtype).max + 1} token ids but "
                        f"model.vocab_size is {vocab_size}; use uint32")
    tokens = _read(p, lambda: np.memmap(p, dtype=np_dtype, mode="r"))
    # A cheap check on a prefix catches the common mistake of reading uint32 data as uint16.
    head_max = int(tokens[: 1 << 20].max()) if len(tokens) else 0
    if head_max >= vocab_size:
        raise DataError(f"token file '{path}' holds token id {head_max} >= model.vocab_size {vocab_size}; "
                        f"check --data-dtype ({dtype}) and the model's vocab_size")
    return tokens


def _read(path: Path, read: Callable[[], Any]) -> Any:
    """Run `read`, turning an OS error (permissions, a vanished file) into a DataError naming the file."""
    try:
        return read()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read: {e.strerror or e}; check the path and its "
                        f"permissions") from None


@dataclass
class TokenSplits:
    """Train and held-out token arrays. The held-out split is the tail of the corpus."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float, block_size: int) -> "TokenSplits":
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"--val-fraction ({val_fraction}) must be in (0, 1)")
        n_val = int(len(tokens) * val_fraction)
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
        for name, arr in (("train", train), ("val", val)):
            if len(arr) <= block_size + 1:
                raise DataError(f"the {name} split has {len(arr)} tokens, too few for block_size {block_size}; "
                                f"use a larger corpus or a smaller block_size")
        return cls(train=train, val=val)


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, stream: int, step: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random batch: the same (seed, stream, step) gives the same batch.

    `stream` separates data-parallel ranks (and eval) so they see different data.
    """
    rng = np.random.default_rng([seed, stream, step])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    rows = np.stack([np.asarray(tokens[s: s + block_size + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(rows)
    x, y = batch[:, :-1], batch[:, 1:]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
