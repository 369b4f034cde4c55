"""One rank of the simulator-agreement test: train like train.py, dump what the simulator must match.

    python tests/workers/sim_agreement_worker.py SCENARIOS.json OUT_DIR

Each scenario is {"name", "ds_config", "steps", "seed", "micro", "eval_every", "eval_batches",
"snap_steps", optional "ns_fp32": Newton-Schulz pinned to fp32, see ns_precision.py}. This rank writes OUT_DIR/<name>.rank<r>.pt with its module parameters at
snap_steps, its training loss at every step (mean over micro-steps), train.py-style eval
losses, outer steps and bytes. Batches are indexed as train.py indexes them.
"""
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import streaming_muloco
from streaming_muloco.data import EVAL_STREAM, TokenSplits, get_batch, load_tokens
from streaming_muloco.model import build_model

BLOCK = 32


def splits() -> TokenSplits:
    """The token split both sides of the test use."""
    return TokenSplits.from_tokens(load_tokens(None)[:200_000], 0.1, BLOCK)


def evaluate(engine: Any, data: TokenSplits, micro: int, seed: int, eval_batches: int) -> float:
    """train.py's evaluate(): rank r scores eval batches r, r+W, ...; the mean over all of them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    engine.eval()
    with torch.no_grad():
        losses = [engine(*get_batch(data.val, micro, BLOCK, seed, EVAL_STREAM, i)).float()
                  for i in range(rank, eval_batches * world, world)]
    engine.train()
    total = torch.stack([torch.stack(losses).sum(), torch.tensor(float(len(losses)))])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main() -> None:
    from ns_precision import newton_schulz_fp32  # run as a script: tests/workers is on sys.path

    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    data = splits()
    for sc in scenarios:
        with newton_schulz_fp32() if sc.get("ns_fp32") else contextlib.nullcontext():
            run(sc, data, out)
    dist.destroy_process_group()


def run(sc: dict, data: Any, out: Path) -> None:
    torch.manual_seed(sc["seed"])
    model = build_model("tiny", block_size=BLOCK, n_embd=32, n_head=2)
    engine, _, _, _ = streaming_muloco.initialize(model=model, config=sc["ds_config"])
    rank = dist.get_rank()
    snapshots, losses, evals = {}, [], []
    accum = engine.gradient_accumulation_steps()
    for step in range(1, sc["steps"] + 1):
        step_loss = 0.0
        for micro_step in range(accum):
            x, y = get_batch(data.train, sc["micro"], BLOCK, sc["seed"], rank, (step - 1) * accum + micro_step)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
        losses.append(step_loss)
        if step in sc["snap_steps"]:
            snapshots[step] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        if step % sc["eval_every"] == 0 or step == sc["steps"]:
            evals.append((step, evaluate(engine, data, sc["micro"], sc["seed"], sc["eval_batches"])))
    info = {"outer_steps": engine.outer.outer_steps if engine.outer else 0,
            "bytes_sent": engine.outer.comm.bytes_sent if engine.outer else 0}
    torch.save({"snapshots": snapshots, "losses": losses, "eval": evals, "info": info},
               out / f"{sc['name']}.rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
    streaming_muloco.exit_process(0)  # not the interpreter teardown, which can abort (its docstring)
