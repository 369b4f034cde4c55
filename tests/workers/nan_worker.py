"""One rank of the bad-numerics test (K=2 replicas x D=1, H=4).

    python tests/workers/nan_worker.py OUT_DIR POLICY [LIGHTHOUSE REPLICA_ID]

With LIGHTHOUSE and REPLICA_ID each replica is its own job (fault tolerance, world size 1).

Replica 1 sees a NaN loss at step 2, and at step 5 its fp32 master weights are overwritten
with NaN (a corrupted update). Rank r writes OUT_DIR/rank<r>.pt with every step's parameters,
the global params theta_g, and the skip counters.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import streaming_muloco
from streaming_muloco.data import get_batch, load_tokens
from streaming_muloco.model import build_model


def main() -> None:
    out, policy = Path(sys.argv[1]), sys.argv[2]
    ft = sys.argv[3:5]
    tokens = load_tokens(None)[:100_000]
    torch.manual_seed(0)
    model = build_model("tiny", block_size=32, n_embd=32, n_head=2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 6,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
           "streaming_muloco": {"num_replicas": 2, "sync_every": 4, "nonfinite_policy": policy}}
    if ft:
        cfg["streaming_muloco"]["fault_tolerance"] = {"enabled": True, "lighthouse": ft[0], "replica_id": int(ft[1]),
                                                      "min_replicas": 2, "timeout_s": 30}
    engine, _, _, _ = streaming_muloco.initialize(model=model, config=cfg)
    engine.join_replicas(0)
    rank = engine.topo.global_rank
    snaps = []
    for step in range(1, 9):
        x, y = get_batch(tokens, 4, 32, seed=0, stream=rank, step=step)
        loss = engine(x, y)
        if rank == 1 and step == 2:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        if rank == 1 and step == 5:
            shard = engine.outer.shard
            shard.scatter(0, torch.full((shard.numels[0],), float("nan")))
            shard.refresh_module_params()
        snaps.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    torch.save({"snapshots": snaps, "theta_g": engine.outer.fragments[0].theta_g.clone(),
                "loss_skipped": engine.nonfinite_skipped}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    streaming_muloco.exit_process(0)  # not the interpreter teardown, which can abort (its docstring)
