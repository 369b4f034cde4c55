"""One rank of the Hugging Face model check: a transformers model built from a small config,
trained through `streaming_muloco.initialize` with DeepSpeed's Muon and the outer loop.

    python tests/workers/hf_worker.py OUT_DIR MODEL STAGE      (MODEL: gpt2 | llama; 2 ranks: K=2, D=1)

Writes OUT_DIR/<MODEL>.rank<r>.pt: the parameters DeepSpeed tagged for Muon, DeepSpeed's own
optimizer groups (each group's use_muon flag and the names of the parameters it holds), the
train losses, and the module parameters after the last outer sync.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import streaming_muloco
from streaming_muloco.data import get_batch, load_tokens

BLOCK, MICRO, STEPS, H = 32, 8, 30, 10


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
                                        tie_word_embeddings=False))


def main() -> None:
    out, kind, stage = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tokens = load_tokens(None)[:200_000]
    model = build(kind)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
              "optimizer": {"type": "Muon", "params": {"muon_lr": 0.02, "adam_lr": 3e-3, "momentum": 0.95,
                                                       "weight_decay": 0.0, "torch_adam": True}},
              "streaming_muloco": {"num_replicas": 2, "sync_every": H, "outer_lr": 0.7,
                                   "inner": {"muon_update_scale": "moonlight"}}}
    engine, _, _, _ = streaming_muloco.initialize(model=model, config=config)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    zero = engine.optimizer  # DeepSpeed's ZeRO optimizer; its groups were built from the use_muon tags
    groups = [{"use_muon": bool(zero.optimizer.param_groups[i].get("use_muon", False)),
               "params": [names[id(p)] for p in group]} for i, group in enumerate(zero.bit16_groups)]
    rank = dist.get_rank()
    losses = []
    for step in range(STEPS):
        x, _ = get_batch(tokens, MICRO, BLOCK, 1, rank, step)
        loss = engine(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save({"muon": engine.muon_param_names(), "groups": groups, "losses": losses, "params": params,
                "outer_steps": engine.outer.outer_steps}, out / f"{kind}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    streaming_muloco.exit_process(0)
