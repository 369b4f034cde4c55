"""Parameter-aware compression: blocks that never straddle two parameters (docs/design.md §5).

A fragment shard is a flat run of pieces of parameters: hidden matrices, the embedding and
head, norm gains and biases. Quantizing fixed blocks of that run mixes them, so one bias
with a large entry sets the scale of a block of small weights. MuLoCo's code instead
quantizes each parameter on its own, row by row, and sends 1-D parameters uncompressed.

Here a fragment shard is described by `ParamExtent`s (which elements of which parameter it
holds, from DeepSpeed's `_hp_mapping` or ZeRO-3's partition) and turned into `Segment`s:
runs of elements quantized in blocks of one size, or sent as fp32. `SegmentedCompressor`
wraps a block quantizer and encodes each segment with its own block grid into one fixed-size
payload: the size is a function of (layout, config), so no rank needs to ask another how
many bytes will arrive.

    granularity "row":   a block is a row of the parameter as a matrix (the last dims
                         flattened, as Muon sees it); a shard that starts mid-row gets the
                         rest of that row as one block.
    granularity "block": blocks of `block_size` from each parameter's first element in the shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .compression import Compressor, Layout, Payload, layout_nbytes, make_layout
from .param_roles import layer_shape, split_roles
from .quantizers import Blocks, _BlockQuantizer

MATRIX, EMBEDDING, HEAD, VECTOR = "matrix", "embedding", "head", "vector"
KINDS = (MATRIX, EMBEDDING, HEAD, VECTOR)
MIN_ROW = 32  # shorter rows (e.g. a (n, 1) weight) would pay more metadata than codes: use blocks
_ALIGN = 4  # every segment's bytes start 4-byte aligned, so its fp32/int32 views need no copy


@dataclass(frozen=True)
class ParamExtent:
    """This shard's elements of one parameter.

    `offset` is the index of its first element in the flattened parameter; `numel` may run past
    the parameter's end (ZeRO-3 pads the last rank's partition with zeros that stay zero).
    """

    name: str
    kind: str  # MATRIX, EMBEDDING, HEAD or VECTOR
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Segment:
    """Elements [start, start + numel) of the shard, quantized in blocks of `block` (0: fp32)."""

    start: int
    numel: int
    block: int


def param_kind(reason: str, shape: tuple[int, ...]) -> str:
    """A parameter's compression kind from its `param_roles` reason and layer shape."""
    if len(shape) < 2:
        return VECTOR
    return {"embedding": EMBEDDING, "output head": HEAD}.get(reason, MATRIX)


def kind_for(kinds: dict[str, str], name: str, shape: tuple[int, ...]) -> str:
    """`name`'s kind from `kinds` (see `param_kinds`), or from its shape alone when it is not
    there (a shard built without the model's roles)."""
    return kinds.get(name) or param_kind("", shape)


def plan_segments(extents: Iterable[ParamExtent], granularity: str, block_size: int,
                  compressed_kinds: frozenset[str] | set[str]) -> tuple[Segment, ...]:
    """The segments of a shard laid out as `extents` (in shard order).

    Neighbouring segments are merged where that changes no block: same block size and the
    first one ends on a block boundary (or both fp32), so a long run of equal rows costs one
    segment.
    """
    if granularity not in ("row", "block"):
        raise ValueError(f"granularity ({granularity!r}) must be 'row' or 'block'")
    if block_size < 1:
        raise ValueError(f"block_size ({block_size}) must be >= 1")
    out: list[Segment] = []

    def add(start: int, numel: int, block: int) -> None:
        if out:
            last = out[-1]
            if last.block == block and (block == 0 or last.numel % block == 0):
                out[-1] = Segment(last.start, last.numel + numel, block)
                return
        out.append(Segment(start, numel, block))

    pos = 0
    for ext in extents:
        if ext.kind not in KINDS:
            raise ValueError(f"parameter {ext.name!r} has kind {ext.kind!r}; expected one of {KINDS}")
        if ext.numel <= 0:
            continue
        row = math.prod(ext.shape[1:]) if len(ext.shape) >= 2 else 0
        if ext.kind not in compressed_kinds:
            add(pos, ext.numel, 0)
        elif granularity == "block" or row < MIN_ROW:
            add(pos, ext.numel, block_size)
        else:
            head = min((-ext.offset) % row, ext.numel)  # the rest of a row this shard starts inside
            if head:
                add(pos, head, head)
            if ext.numel > head:
                add(pos + head, ext.numel - head, row)
        pos += ext.numel
    return tuple(out)


def cut_segments(segments: tuple[Segment, ...], start: int, stop: int) -> tuple[Segment, ...]:
    """The segments of elements [start, stop), renumbered from 0 (a two-phase chunk).

    A block the cut goes through becomes its own shorter block. Elements past the last
    segment (the zero padding of the tail chunk) are sent as fp32.
    """
    out: list[Segment] = []
    end_all = segments[-1].start + segments[-1].numel if segments else 0
    for seg in segments:
        s, e = max(start, seg.start), min(stop, seg.start + seg.numel)
        if s >= e:
            continue
        if seg.block:
            grid = seg.start + -(-(s - seg.start) // seg.block) * seg.block  # first block start >= s
            if grid > s:
                head_end = min(grid, e)
                out.append(Segment(s - start, head_end - s, head_end - s))
                s = head_end
        if s < e:
            out.append(Segment(s - start, e - s, seg.block))
    if stop > max(start, end_all):
        pad_from = max(start, end_all)
        out.append(Segment(pad_from - start, stop - pad_from, 0))
    return tuple(out)


class SegmentedCompressor(Compressor):
    """A block quantizer applied segment by segment to a shard of fixed layout.

    The payload is one uint8 buffer: each segment's own payload (codes and metadata laid out
    by the quantizer's `block_layout`) or its fp32 values, back to back, each padded to 4
    bytes. Scratch buffers are the wrapped quantizer's, so use one per thread.
    """

    def __init__(self, quantizer: _BlockQuantizer, segments: tuple[Segment, ...]) -> None:
        super().__init__()
        self.q = quantizer
        self.method, self.bits, self.block_size = quantizer.method, quantizer.bits, quantizer.block_size
        self.segments = segments
        self.numel = sum(s.numel for s in segments)
        self._parts: list[tuple[Segment, int, int, Layout | None]] = []
        off = 0
        for seg in segments:
            layout = None if seg.block == 0 else quantizer.block_layout(seg.numel, seg.block)
            size = 4 * seg.numel if layout is None else layout_nbytes(layout)
            self._parts.append((seg, off, size, layout))
            off += -(-size // _ALIGN) * _ALIGN
        self._nbytes = off

    @property
    def name(self) -> str:
        return f"{self.q.name}/segmented"

    def layout(self, numel: int) -> Layout:
        if numel != self.numel:
            raise ValueError(f"this segmented compressor encodes {self.numel} elements (its shard's layout), "
                             f"not {numel}")
        return make_layout((torch.uint8, self._nbytes), (torch.float32, 0), (torch.int32, 0))

    def release_scratch(self) -> None:
        self.q.release_scratch()

    def _sub(self, buf: torch.Tensor, off: int, size: int, seg: Segment, layout: Layout) -> Payload:
        return Payload.from_flat_bytes(buf[off:off + size], layout, method=self.method, numel=seg.numel,
                                       bits=self.bits, block_size=seg.block)

    def _encode(self, x: torch.Tensor, p: Payload) -> None:
        for seg, off, size, layout in self._parts:
            xs = x[seg.start:seg.start + seg.numel]
            if layout is None:
                p.codes[off:off + size].view(torch.float32).copy_(xs)
            else:
                self.q._quantize(xs, self._sub(p.codes, off, size, seg, layout),
                                 Blocks(seg.numel, seg.block, x.device))

    def _decode(self, p: Payload, out: torch.Tensor) -> None:
        buf = p.codes
        if buf.data_ptr() % _ALIGN:
            buf = buf.clone()  # a slice of a gathered buffer: realign once, not per segment
        for seg, off, size, layout in self._parts:
            os = out[seg.start:seg.start + seg.numel]
            if layout is None:
                os.copy_(buf[off:off + size].view(torch.float32))
            else:
                self.q._dequantize(self._sub(buf, off, size, seg, layout), os,
                                   Blocks(seg.numel, seg.block, buf.device))


def param_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Name -> compression kind for every parameter of `model`, by module (as `param_roles`)."""
    reasons = split_roles(model).reasons
    return {n: param_kind(reasons[n], layer_shape(p)) for n, p in model.named_parameters()}


def compressed_kinds(method: str, compress_vectors: bool, compress_embedding: bool,
                     compress_head: bool) -> frozenset[str]:
    """The kinds a `CompressionConfig` quantizes; the rest travel as fp32."""
    flags = {MATRIX: True, VECTOR: compress_vectors, EMBEDDING: compress_embedding, HEAD: compress_head}
    return frozenset(k for k, on in flags.items() if on and method != "none")
