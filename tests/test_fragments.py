"""Splitting parameter names into fragments of whole blocks."""
from __future__ import annotations

import pytest

from streaming_muloco.fragments import assign_fragments, fragment_of


def gpt_names(n_blocks: int = 6, head: bool = True) -> list[str]:
    names = ["embed.weight"]
    for i in range(n_blocks):
        names += [f"blocks.{i}.attn_norm.weight", f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight",
                  f"blocks.{i}.mlp.fc.weight", f"blocks.{i}.mlp.proj.weight"]
    names.append("final_norm.weight")
    if head:
        names.append("lm_head.weight")
    return names


def blocks_in(fragment: list[str]) -> list[int]:
    return sorted({int(n.split(".")[1]) for n in fragment if n.startswith("blocks.")})


def assert_partition(names: list[str], frags: list[list[str]]) -> None:
    """Every name in exactly one fragment, each fragment in the original order."""
    assert sorted(n for f in frags for n in f) == sorted(names)
    pos = {n: i for i, n in enumerate(names)}
    for f in frags:
        assert [pos[n] for n in f] == sorted(pos[n] for n in f)


def test_strided_deals_blocks_round_robin() -> None:
    names = gpt_names(6)
    frags = assign_fragments(names, 3)
    assert_partition(names, frags)
    assert [blocks_in(f) for f in frags] == [[0, 3], [1, 4], [2, 5]]


def test_sequential_gives_contiguous_even_runs() -> None:
    names = gpt_names(6)
    assert [blocks_in(f) for f in assign_fragments(names, 3, strategy="sequential")] == [[0, 1], [2, 3], [4, 5]]
    frags = assign_fragments(names, 4, strategy="sequential")
    assert_partition(names, frags)
    assert [blocks_in(f) for f in frags] == [[0, 1], [2, 3], [4], [5]]


def test_default_split_puts_embedding_first_and_head_last() -> None:
    frags = assign_fragments(gpt_names(6), 2)
    assert frags[0][0] == "embed.weight"
    assert frags[1][-2:] == ["final_norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("placement,where", [("first", 0), ("last", 2)])
def test_non_block_params_join_one_fragment(placement: str, where: int) -> None:
    names = gpt_names(6)
    frags = assign_fragments(names, 3, non_block_placement=placement)
    assert_partition(names, frags)
    assert {"embed.weight", "final_norm.weight", "lm_head.weight"} <= set(frags[where])
    assert [blocks_in(f) for f in frags] == [[0, 3], [1, 4], [2, 5]]


def test_own_makes_non_block_params_fragment_zero() -> None:
    names = gpt_names(6)
    frags = assign_fragments(names, 3, non_block_placement="own")
    assert_partition(names, frags)
    assert frags[0] == ["embed.weight", "final_norm.weight", "lm_head.weight"]
    assert [blocks_in(f) for f in frags[1:]] == [[0, 2, 4], [1, 3, 5]]


def test_one_fragment_needs_no_block_structure() -> None:
    names = ["weight", "bias"]
    assert assign_fragments(names, 1) == [names]


def test_prefixed_and_other_block_names_are_recognised() -> None:
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.weight" for i in range(4)] + ["lm_head.weight"]
    frags = assign_fragments(names, 2)
    assert frags == [["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.2.mlp.weight"],
                     ["model.layers.1.mlp.weight", "model.layers.3.mlp.weight", "lm_head.weight"]]


def test_explicit_patterns_override_the_block_split() -> None:
    names = gpt_names(2)
    patterns = [[r"^embed", r"^blocks\.0\."], [r"^blocks\.1\.", r"^final_norm", r"^lm_head"]]
    frags = assign_fragments(names, 2, patterns=patterns)
    assert_partition(names, frags)
    assert fragment_of(frags)["final_norm.weight"] == 1
    assert fragment_of(frags)["blocks.0.mlp.fc.weight"] == 0


def test_more_fragments_than_blocks_names_the_argument_and_the_count() -> None:
    with pytest.raises(ValueError, match=r"^num_fragments \(4\).*has 3"):
        assign_fragments(gpt_names(3), 4)
    with pytest.raises(ValueError, match=r"^num_fragments \(2\).*has 0"):
        assign_fragments(["weight", "bias"], 2)


def test_own_needs_two_fragments_and_non_block_params() -> None:
    with pytest.raises(ValueError, match=r"num_fragments >= 2"):
        assign_fragments(gpt_names(2), 1, non_block_placement="own")
    only_blocks = [f"blocks.{i}.w" for i in range(2)]
    with pytest.raises(ValueError, match=r"fragment 0 of 2 is empty"):
        assign_fragments(only_blocks, 2, non_block_placement="own")


THREE = ["embed.weight", "blocks.0.w", "lm_head.weight"]


@pytest.mark.parametrize("names,patterns,message", [
    (THREE, [[r"^blocks"], [r"head"]], r"'embed\.weight' matches no fragment pattern"),
    (THREE, [[r"."], [r"head"]], r"'lm_head\.weight' matches the patterns of fragments \[0, 1\]"),
    (THREE, [[r"."]], r"num_fragments \(2\) must equal the number of fragment pattern lists \(1\)"),
    (["embed.weight"], [[r"."], [r"nothing-matches-this"]], r"fragment 1 of 2 is empty"),
])
def test_bad_patterns_name_the_parameter_and_the_fix(names: list[str], patterns: list[list[str]],
                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_fragments(names, 2, patterns=patterns)


def test_bad_strategy_and_placement_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"^fragment_strategy \('zigzag'\)"):
        assign_fragments(gpt_names(2), 2, strategy="zigzag")
    with pytest.raises(ValueError, match=r"non_block_placement \('middle'\)"):
        assign_fragments(gpt_names(2), 2, non_block_placement="middle")
