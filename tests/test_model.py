"""The LM alone: shapes, causality, names the rest of the system relies on, and that it learns."""
import pytest
import torch

from streaming_muloco.model import GPT, ModelConfig, build_model


def test_logits_have_batch_time_vocab_shape():
    model = build_model("tiny")
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)


def test_loss_is_scalar_near_log_vocab_at_init():
    model = build_model("tiny")
    idx = torch.randint(0, 256, (4, 32))
    loss = model(idx, idx)
    assert loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    idx = torch.randint(0, 256, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 256
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:], atol=1e-3)


def test_parameter_names_carry_embed_head_and_block_index():
    names = [n for n, _ in build_model("tiny").named_parameters()]
    assert "embed.weight" in names and "lm_head.weight" in names
    assert any(n.startswith("blocks.0.") for n in names) and any(n.startswith("blocks.1.") for n in names)
    tied = [n for n, _ in build_model("tiny", tie_embeddings=True).named_parameters()]
    assert "lm_head.weight" not in tied


def test_presets_scale_parameter_count():
    tiny = build_model("tiny").num_params()
    small = build_model("small").num_params()
    assert 100_000 < tiny < small
    # Large presets are only shape-checked: count without allocating billions of floats.
    cfg = ModelConfig(n_layer=16, n_head=32, n_embd=2048, vocab_size=50304)
    with torch.device("meta"):
        assert GPT(cfg).num_params() > 900_000_000


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build_model("tiny")
    idx = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("bad, key", [(dict(n_embd=30, n_head=4), "n_embd"), (dict(n_layer=0), "n_layer")])
def test_bad_shapes_raise_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        build_model("tiny", **bad)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny"):
        build_model("nope")


def test_sequence_longer_than_block_size_is_rejected():
    model = build_model("tiny", block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
