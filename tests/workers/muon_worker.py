"""One rank of the Muon check: one DeepSpeed Muon step per (ZeRO stage, update scale).

    python tests/workers/muon_worker.py OUT_DIR

Every rank feeds the same batch, so the replica's averaged gradient is that batch's gradient,
which rank 0 also computes with plain torch on an identical model copy. Rank 0 saves the
weights before/after the step and that gradient for each Muon-tagged matrix.
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import streaming_muloco
from streaming_muloco.data import get_batch, load_tokens
from streaming_muloco.model import build_model

LR = 0.02


def main() -> None:
    out = Path(sys.argv[1])
    tokens = load_tokens(None)[:100_000]
    for stage in (1, 2):
        for scale in ("deepspeed", "moonlight"):
            torch.manual_seed(0)
            model = build_model("tiny", block_size=32)
            twin = copy.deepcopy(model)
            cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                   "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
                   "optimizer": {"type": "Muon", "params": {"muon_lr": LR, "adam_lr": 1e-3, "momentum": 0.95,
                                                            "weight_decay": 0.0, "torch_adam": True}},
                   "streaming_muloco": {"enabled": False, "inner": {"muon_update_scale": scale}}}
            engine, _, _, _ = streaming_muloco.initialize(model=model, config=cfg)
            x, y = get_batch(tokens, 8, 32, seed=3, stream=0, step=0)
            twin(x, y).backward()
            names = engine.muon_param_names()
            before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if n in names}
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            after = {n: p.detach().clone() for n, p in engine.module.named_parameters() if n in names}
            grads = {n: p.grad.clone() for n, p in twin.named_parameters() if n in names}
            if dist.get_rank() == 0:
                torch.save({"before": before, "after": after, "grad": grads, "lr": LR},
                           out / f"muon_z{stage}_{scale}.pt")
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    streaming_muloco.exit_process(0)  # not the interpreter teardown, which can abort (its docstring)
