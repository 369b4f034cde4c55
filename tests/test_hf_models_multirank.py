"""Hugging Face models (built from small configs, random init, nothing downloaded) through
`streaming_muloco.initialize` on 2 real ranks (K=2 replicas, D=1, gloo): DeepSpeed's optimizer
groups follow the split by module, the loss falls, and the replicas are bit-identical after
the last outer sync.
"""
import pytest
import torch

from multirank import run_ranks
from streaming_muloco.param_roles import MUON, split_roles
from test_param_roles import gpt2, llama

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("kind, stage", [("gpt2", 1), ("llama", 2)])
def test_hf_model_trains_with_the_module_split_and_replicas_agree(tmp_path, kind, stage):
    res = run_ranks(2, ["tests/workers/hf_worker.py", str(tmp_path), kind, str(stage)], timeout=400)
    assert res.ok, res.describe()
    r0, r1 = (torch.load(tmp_path / f"{kind}.rank{r}.pt") for r in (0, 1))
    # The split param_roles gives the same architecture (the worker's config differs only in size).
    ref = gpt2() if kind == "gpt2" else llama()
    expected = set(split_roles(ref).names(MUON))
    assert set(r0["muon"]) == expected
    # DeepSpeed built its groups from those tags: every Muon group holds exactly the Muon set.
    in_muon_groups = {n for g in r0["groups"] if g["use_muon"] for n in g["params"]}
    in_adam_groups = {n for g in r0["groups"] if not g["use_muon"] for n in g["params"]}
    assert in_muon_groups == expected
    assert in_adam_groups and not in_adam_groups & expected
    embeddings = {"gpt2": {"transformer.wte.weight", "transformer.wpe.weight"},
                  "llama": {"model.embed_tokens.weight", "lm_head.weight"}}[kind]
    assert embeddings <= in_adam_groups
    assert "[streaming_muloco] inner optimizer roles by module" in res.outputs[0]
    assert "inner optimizer roles" not in res.outputs[1]  # printed once, by rank 0
    for r in (r0, r1):
        assert r["outer_steps"] == 3
        first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
        assert last < first - 0.3, (first, last)
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
