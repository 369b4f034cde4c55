"""The inner optimizer of both sides of bench_vs_torchft.py, alone: no outer loop, one process.

DeepSpeed ZeRO-1 AdamW (what ours runs, on one flat fp32 partition) against torch AdamW on the
module's tensors (what the torchft replica runs), from the same initial weights, on the same
batches, with the same WarmupCosineLR. Prints, per step, both losses, both learning rates and
the largest parameter difference. It shows where their trajectories part before any outer sync.

    DS_ACCELERATOR=cpu python benchmarks/inner_stack_check.py --steps 8
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="small")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--total-steps", type=int, default=100, help="the LR schedule's length, as in the benchmark")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29813", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from streaming_muloco.data import TokenSplits, get_batch, load_tokens
    from streaming_muloco.model import build_model

    ds = json.loads((REPO / "ds_configs/diloco_cpu.json").read_text())
    ds.pop("streaming_muloco")
    ds["train_micro_batch_size_per_gpu"] = a.micro_batch
    ds["scheduler"]["params"]["total_num_steps"] = a.total_steps
    torch.manual_seed(a.seed)
    ours = build_model(a.model, n_embd=a.n_embd)
    plain = copy.deepcopy(ours)
    block = ours.cfg.block_size
    splits = TokenSplits.from_tokens(load_tokens(None), 0.05, block)
    engine, _, _, _ = deepspeed.initialize(model=ours, model_parameters=ours.parameters(), config=ds)
    o, sp = ds["optimizer"]["params"], ds["scheduler"]["params"]
    adamw = torch.optim.AdamW(plain.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                              weight_decay=o["weight_decay"])
    sched = WarmupCosineLR(adamw, total_num_steps=a.total_steps, warmup_min_ratio=sp["warmup_min_ratio"],
                           warmup_num_steps=sp["warmup_num_steps"], cos_min_ratio=sp["cos_min_ratio"])
    print("step | DeepSpeed ZeRO-1 AdamW loss | torch AdamW loss | lr (both) | max |param difference|")
    for step in range(1, a.steps + 1):
        x, y = get_batch(splits.train, a.micro_batch, block, a.seed, 0, step - 1)
        l1 = engine(x, y)
        engine.backward(l1)
        lr1 = engine.get_lr()[0]
        engine.step()
        l2 = plain(x, y)
        l2.backward()
        lr2 = adamw.param_groups[0]["lr"]
        adamw.step()
        sched.step()
        adamw.zero_grad()
        diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), plain.parameters()))
        assert abs(lr1 - lr2) < 1e-12, (lr1, lr2)
        print(f"{step} | {l1.item():.6f} | {l2.item():.6f} | {lr1:.6g} | {diff:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
