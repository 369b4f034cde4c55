"""Muon or AdamW by module (param_roles.py): the bundled model, HF GPT-2 and HF Llama from small
configs (random init, nothing downloaded), the adamw_params override and its errors.

That DeepSpeed really builds its optimizer groups from this split is tested with real ranks in
tests/test_hf_models_multirank.py.
"""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from streaming_muloco.config import ConfigError, split_config
from streaming_muloco.engine import plan_roles
from streaming_muloco.model import build_model
from streaming_muloco.param_roles import ADAMW, MUON, output_head, split_roles


def gpt2(tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      tie_word_embeddings=tied))


def llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


def deepspeed_name_rule(model: torch.nn.Module) -> dict[str, str]:
    """deepspeed.set_optimizer_flags's own rule (0.19.8), for comparison."""
    return {n: MUON if p.ndim >= 2 and not any(k in n.lower() for k in ("embed", "lm_head")) else ADAMW
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_bundled_model_split_is_unchanged_from_deepspeeds_name_rule(tied):
    model = build_model("tiny", tie_embeddings=tied)
    split = split_roles(model)
    assert split.roles == deepspeed_name_rule(model)  # the bit-exact reference tests depend on this
    assert split.reasons["embed.weight"] == "embedding"
    if not tied:
        assert split.reasons["lm_head.weight"] == "output head"
    muon = split.names(MUON)
    assert muon and all(n.startswith("blocks.") and n.endswith(".weight") for n in muon)


def test_hf_gpt2_embeddings_go_to_adamw_where_deepspeeds_rule_gives_them_muon():
    model = gpt2(tied=True)
    split = split_roles(model)
    assert deepspeed_name_rule(model)["transformer.wte.weight"] == MUON  # the bug the issue found
    assert deepspeed_name_rule(model)["transformer.wpe.weight"] == MUON
    assert split.roles["transformer.wte.weight"] == ADAMW and split.reasons["transformer.wte.weight"] == "embedding"
    assert split.roles["transformer.wpe.weight"] == ADAMW and split.reasons["transformer.wpe.weight"] == "embedding"
    assert "lm_head.weight" not in split.roles  # tied: named_parameters lists the shared tensor once, as wte
    # Conv1D weights are GPT-2's hidden matrices: Muon. Everything 1-D (biases, ln_*): AdamW.
    expected_muon = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(split.names(MUON)) == expected_muon
    for name in split.names(ADAMW):
        if name not in ("transformer.wte.weight", "transformer.wpe.weight"):
            assert split.reasons[name] == "1-D", name


def test_hf_gpt2_untied_head_is_found_and_goes_to_adamw():
    model = gpt2(tied=False)
    assert output_head(model) is model.lm_head
    split = split_roles(model)
    assert split.roles["lm_head.weight"] == ADAMW and split.reasons["lm_head.weight"] == "output head"


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_split(tied):
    model = llama(tied)
    split = split_roles(model)
    assert split.reasons["model.embed_tokens.weight"] == "embedding"
    if not tied:
        assert split.reasons["lm_head.weight"] == "output head"
    expected_muon = {f"model.layers.{i}.{m}.weight" for i in range(2)
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(split.names(MUON)) == expected_muon
    norms = [n for n in split.roles if "norm" in n]
    assert norms and all(split.reasons[n] == "1-D" for n in norms)
    assert sum(split.numels.values()) == sum(p.numel() for p in model.parameters())


def test_head_without_hf_api_is_the_last_linear_onto_the_vocabulary_outside_the_layer_stack():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(50, 8)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 50)])  # onto 50 features, in the stack
            self.mix = torch.nn.Linear(8, 50)  # onto 50 features, but not the last such layer
            self.out = torch.nn.Linear(50, 50)

    model = Tiny()
    assert output_head(model) is model.out
    split = split_roles(model)
    assert split.reasons == {"tok.weight": "embedding", "layers.0.weight": "matrix", "layers.0.bias": "1-D",
                             "mix.weight": "matrix", "mix.bias": "1-D",
                             "out.weight": "output head", "out.bias": "output head"}


def test_adamw_params_override_moves_matches_to_adamw_and_summary_counts_them():
    model = llama()
    split = split_roles(model, [r"mlp\.(gate|up)_proj"])
    moved = [n for n, r in split.reasons.items() if r.startswith("adamw_params")]
    assert sorted(moved) == sorted(f"model.layers.{i}.mlp.{m}_proj.weight" for i in range(2) for m in ("gate", "up"))
    assert all(split.roles[n] == ADAMW for n in moved)
    text = split.summary()
    muon_line, adamw_line = text.splitlines()
    assert muon_line == (f"Muon: {len(split.names(MUON))} tensors, "
                         f"{sum(split.numels[n] for n in split.names(MUON)):,} params")
    assert adamw_line.startswith(f"AdamW: {len(split.names(ADAMW))} tensors, ")
    assert "adamw_params 'mlp\\\\.(gate|up)_proj'" in adamw_line and "embedding: model.embed_tokens.weight" in adamw_line


def _cfg(inner: dict, opt: str = "Muon") -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "gradient_clipping": 0,
            "optimizer": {"type": opt, "params": {"lr": 1e-3}}, "streaming_muloco": {"inner": inner}}


def test_adamw_params_pattern_that_matches_nothing_is_a_config_error_naming_the_key():
    _, cfg = split_config(_cfg({"adamw_params": ["lm_haed"]}))
    with pytest.raises(ConfigError, match=r"streaming_muloco\.inner\.adamw_params pattern\(s\) \['lm_haed'\] match "
                                          r"no parameter name"):
        plan_roles(llama(), cfg)


@pytest.mark.parametrize("inner, opt, message", [
    ({"adamw_params": ["("]}, "Muon", r"streaming_muloco\.inner\.adamw_params\[0\] \('\('\) is not a valid regular "
                                      r"expression"),
    ({"adamw_params": "lm_head"}, "Muon", r"streaming_muloco\.inner\.adamw_params must be a list, got 'lm_head'"),
    ({"adamw_params": [3]}, "Muon", r"streaming_muloco\.inner\.adamw_params\[0\] must be a string, got 3"),
    ({"adamw_params": ["lm_head"]}, "AdamW", r"streaming_muloco\.inner\.adamw_params chooses which parameters Muon "
                                             r"leaves to AdamW, but optimizer\.type is 'AdamW'"),
])
def test_bad_adamw_params_are_config_errors(inner, opt, message):
    with pytest.raises(ConfigError, match=message):
        split_config(json.loads(json.dumps(_cfg(inner, opt))))
