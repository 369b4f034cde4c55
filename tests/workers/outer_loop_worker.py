"""One rank of a multi-rank outer-loop test: run scenarios, dump parameters after outer syncs.

    python tests/workers/outer_loop_worker.py SCENARIOS.json OUT_DIR

Each scenario is {"name", "ds_config", "steps", "seed", "micro"}. For every scenario this rank
writes OUT_DIR/<name>.rank<r>.pt holding the full module parameters after every inner step and
every scalar metric the engine reported on this rank.
Runs several scenarios in one process group so the test pays process start-up once.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import streaming_muloco
from streaming_muloco.metrics import MetricsLogger
from streaming_muloco.data import get_batch, load_tokens
from streaming_muloco.model import build_model
from ns_precision import newton_schulz_fp32

BLOCK = 32


class RecordingLogger(MetricsLogger):
    """Keeps every scalar the engine reports on this rank, to be saved with the snapshots."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int]] = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.rows.append((tag, float(value), step))


def full_params(engine) -> dict:
    """The module's parameters, whole: under ZeRO-3 partitioned ones are gathered for the copy."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params],
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params}


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    tokens = load_tokens(None)[:200_000]
    for sc in scenarios:
        torch.manual_seed(sc["seed"])
        model = build_model("tiny", block_size=BLOCK, n_embd=32, n_head=2)
        metrics = RecordingLogger()
        engine, _, _, _ = streaming_muloco.initialize(model=model, config=sc["ds_config"], metrics=metrics)
        rank = dist.get_rank()
        snapshots = []
        for step in range(1, sc["steps"] + 1):
            x, y = get_batch(tokens, sc["micro"], BLOCK, sc["seed"], rank, step - 1)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            snapshots.append(full_params(engine))
        info = {"muon": engine.muon_param_names(), "replica": engine.replica_id, "shard": engine.shard_id,
                "outer_steps": engine.outer.outer_steps if engine.outer else 0,
                "bytes_sent": engine.outer.comm.bytes_sent if engine.outer else 0,
                "outer_state": {"on_host": engine.outer.store.on_host,
                                "bytes": engine.outer.state_nbytes()["total"]} if engine.outer else None}
        if engine.outer:
            shard = engine.outer.shard
            info["extents"] = [[(e.name, e.kind, e.offset, e.numel) for e in shard.extents(p)]
                               for p in range(len(shard.params))]
            info["view_numels"] = [[v.numel() for v in shard.views(p)] for p in range(len(shard.params))]
            info["param_numels"] = {n: getattr(p, "ds_numel", p.numel()) for n, p in engine.module.named_parameters()}
            plans = engine.outer.exchange.plans
            info["plans"] = None if plans is None else [[(s.start, s.numel, s.block) for s in plan] for plan in plans]
            engine.outer.observer.summary()  # the last sync's metrics arrive here
        info["metrics"] = metrics.rows
        torch.save({"snapshots": snapshots, "info": info}, out / f"{sc['name']}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with newton_schulz_fp32():  # as the reference in tests/test_outer_loop_multirank.py
        main()
    streaming_muloco.exit_process(0)  # not the interpreter teardown, which can abort (its docstring)
