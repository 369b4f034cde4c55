"""Split a model's named parameters into P fragments of whole transformer blocks.

Streaming DiLoCo syncs one fragment at a time, so a fragment's size is the peak traffic of
one outer sync. The split is a pure function of the parameter names: every rank computes the
same fragments in the same order without talking to the others.

Blocks: a parameter whose name matches `block_pattern` (group 1 = block index) belongs to that
block. The default matches `blocks.3.`, `layers.3.` and `h.3.`, at the start or after a dot
(`model.layers.3.mlp...`). Block indices are ranked in ascending order, so gaps are harmless.
- "strided" (default): fragment p holds blocks p, p+P, p+2P, ... Every fragment then spans
  the whole depth, as in the Streaming DiLoCo paper.
- "sequential": contiguous runs of blocks; the first (n_blocks % P) runs get one extra block.

Non-block parameters (embeddings, final norm, lm_head), `non_block_placement`:
- "split" (default): those listed before the first block parameter (the embedding) join
  fragment 0; all others (final norm, head) join fragment P-1. An embedding or a head can be
  as large as several blocks, so keeping them apart keeps the per-fragment peak even.
- "first" / "last": all of them join fragment 0 / fragment P-1.
- "own": they alone form fragment 0 and the blocks are split over fragments 1..P-1. P still
  counts all fragments (the schedule stays the same), so "own" needs P >= 2.

With P = 1 everything is one fragment and no block structure is needed, so any nn.Module
works. For P > 1 on a model without a block structure, pass `patterns`: P lists of regexes
(matched with `re.search`); each parameter must match exactly one fragment's list.

Within a fragment, parameters keep the order of `param_names`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence


DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:blocks|layers|h)\.(\d+)\."
STRATEGIES = ("strided", "sequential")
PLACEMENTS = ("split", "first", "last", "own")


def assign_fragments(param_names: Sequence[str], num_fragments: int, strategy: str = "strided",
                     block_pattern: str = DEFAULT_BLOCK_PATTERN, non_block_placement: str = "split",
                     patterns: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Assign every parameter name to exactly one of `num_fragments` fragments.

    Args:
        param_names: parameter names in module order (`named_parameters()`), identical on all ranks.
        num_fragments: P.
        strategy: "strided" or "sequential" (how blocks are dealt out).
        block_pattern: regex whose group 1 is the block index.
        non_block_placement: "split", "first", "last" or "own" (see the module docstring).
        patterns: P lists of regexes; when given, overrides all of the above.

    Returns:
        P lists of names; fragment p's list is in the original order.

    Raises:
        ValueError: a bad option, fewer blocks than fragments, an empty
        fragment, or a parameter that `patterns` matches zero or several times.
    """
    names = list(param_names)
    P = num_fragments
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"num_fragments ({P!r}) must be an integer >= 1")
    if not names:
        raise ValueError("assign_fragments got no parameters: pass the names of the trainable parameters")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"parameter name {dup!r} appears twice: names must be unique")
    if strategy not in STRATEGIES:
        raise ValueError(f"fragment_strategy ({strategy!r}) must be one of {list(STRATEGIES)}")
    if non_block_placement not in PLACEMENTS:
        raise ValueError(f"non_block_placement ({non_block_placement!r}) must be one of {list(PLACEMENTS)}")
    if non_block_placement == "own" and P < 2 and patterns is None:
        raise ValueError(f"non_block_placement='own' needs num_fragments >= 2 (got {P}): fragment 0 "
                          f"holds the non-block parameters and the blocks need at least one more")
    if patterns is not None:
        owner = _owners_by_patterns(names, P, patterns)
    elif P == 1:
        owner = [0] * len(names)
    else:
        owner = _owners_by_blocks(names, P, strategy, block_pattern, non_block_placement)
    fragments: list[list[str]] = [[] for _ in range(P)]
    for name, p in zip(names, owner):
        fragments[p].append(name)
    for p, frag in enumerate(fragments):
        if not frag:
            raise ValueError(f"fragment {p} of {P} is empty: lower num_fragments, or change the "
                              f"placement/patterns so every fragment gets parameters")
    return fragments


def fragment_of(fragments: Sequence[Sequence[str]]) -> dict[str, int]:
    """Name -> fragment id, the inverse of `assign_fragments`."""
    return {name: p for p, frag in enumerate(fragments) for name in frag}


def _owners_by_blocks(names: list[str], P: int, strategy: str, block_pattern: str,
                      placement: str) -> list[int]:
    """Fragment id per name, from the block structure.

    1. Find each name's block index (None for non-block parameters).
    2. Deal the ranked blocks out to the block fragments (all P, or 1..P-1 for "own").
    3. Place the non-block parameters.
    """
    regex = re.compile(block_pattern)
    if regex.groups < 1:
        raise ValueError(f"block_pattern ({block_pattern!r}) needs a capturing group for the block index")

    block_of: list[int | None] = []
    for name in names:
        m = regex.search(name)
        block_of.append(int(m.group(1)) if m else None)
    blocks = sorted({b for b in block_of if b is not None})

    first_block_frag = 1 if placement == "own" else 0
    n_block_frags = P - first_block_frag
    if len(blocks) < n_block_frags:
        raise ValueError(f"num_fragments ({P}) needs at least {n_block_frags} transformer blocks "
                          f"to split, but the model has {len(blocks)} (block_pattern {block_pattern!r}); lower "
                          f"num_fragments, fix block_pattern, or pass explicit fragment patterns")

    frag_of_rank = _deal(len(blocks), n_block_frags, strategy)
    frag_of_block = {b: first_block_frag + frag_of_rank[i] for i, b in enumerate(blocks)}

    first_block_pos = next(i for i, b in enumerate(block_of) if b is not None)
    non_block = {"first": lambda i: 0, "last": lambda i: P - 1, "own": lambda i: 0,
                 "split": lambda i: 0 if i < first_block_pos else P - 1}[placement]
    return [frag_of_block[b] if b is not None else non_block(i) for i, b in enumerate(block_of)]


def _deal(n_blocks: int, n_frags: int, strategy: str) -> list[int]:
    """Fragment (0-based among the block fragments) of each block rank."""
    if strategy == "strided":
        return [i % n_frags for i in range(n_blocks)]
    q, r = divmod(n_blocks, n_frags)
    sizes = [q + 1 if p < r else q for p in range(n_frags)]
    return [p for p, size in enumerate(sizes) for _ in range(size)]


def _owners_by_patterns(names: list[str], P: int, patterns: Sequence[Sequence[str]]) -> list[int]:
    """Fragment id per name, from explicit regexes; a name must match exactly one fragment."""
    if len(patterns) != P:
        raise ValueError(f"num_fragments ({P}) must equal the number of fragment pattern lists "
                          f"({len(patterns)}): give one list of regexes per fragment")
    compiled = [[re.compile(r) for r in frag] for frag in patterns]
    owner = []
    for name in names:
        hits = [p for p, regexes in enumerate(compiled) if any(r.search(name) for r in regexes)]
        if not hits:
            raise ValueError(f"parameter {name!r} matches no fragment pattern: add a regex for it to one "
                              f"fragment's list")
        if len(hits) > 1:
            raise ValueError(f"parameter {name!r} matches the patterns of fragments {hits}: make the pattern "
                              f"lists disjoint so it belongs to exactly one")
        owner.append(hits[0])
    return owner
