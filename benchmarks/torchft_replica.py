"""One replica of torchft's Streaming DiLoCo (`torchft.local_sgd.DiLoCo`), for the side-by-side
benchmark (benchmarks/bench_vs_torchft.py). Not part of the library.

It trains what `python -m streaming_muloco.train --ds-config ds_configs/diloco_cpu.json` trains
on one replica rank, with torchft's own code doing the outer loop, used as its docs and tests
use it:
- the same model (`build_model`, seeded alike), the same token streams (replica k reads stream
  k, as rank k of our job does), the same eval batches and eval protocol;
- the same inner optimizer and schedule as the config (torch AdamW, DeepSpeed's WarmupCosineLR
  on it; DeepSpeed ZeRO-1 with D=1 runs that same torch AdamW on the fp32 params);
- a torchft `Manager` (synchronous quorum, as DiLoCo requires) on torchft's `ProcessGroupGloo`,
  with the lighthouse given; `DiLoCo(manager, fragments, inner, outer optimizers per fragment,
  sync_every=H, fragment_sync_delay=τ, fragment_update_alpha=0, use_bucketization=True)`; the
  Manager's `init_sync=False`, which torchft's docs ask for when every replica is seeded alike;
- fragments: the same parameter split as ours (`streaming_muloco.fragments.assign_fragments`),
  each wrapped in an nn.Module so torchft can hold it; one torch SGD(lr, momentum, nesterov) per
  fragment with the config's outer lr and momentum.

torchft's `should_quantize` needs CUDA and Triton, so it is not used here (fp32 only).

    python benchmarks/torchft_replica.py --replica-id 0 --lighthouse http://HOST:PORT --steps 90 --out r0.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fragment_module(model, names: list[str]):
    """The model's own parameters `names`, held by one nn.Module (torchft takes modules)."""
    import torch

    frag, params = torch.nn.Module(), dict(model.named_parameters())
    for i, n in enumerate(names):
        frag.register_parameter(f"p{i}_" + n.replace(".", "_"), params[n])
    return frag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replica-id", type=int, required=True)
    ap.add_argument("--num-replicas", type=int, default=2)
    ap.add_argument("--lighthouse", required=True, help="http://HOST:PORT")
    ap.add_argument("--hostname", default=None, help="address the other replicas reach this one at")
    ap.add_argument("--ds-config", default="ds_configs/diloco_cpu.json", help="inner/outer hyperparameters")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--sync-every", type=int, default=30)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--sync-delay", type=int, default=1)
    ap.add_argument("--model", default="small")
    ap.add_argument("--n-embd", type=int, default=None)
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("RUST_LOG", "warn")
    logging.getLogger("torchft").setLevel(logging.ERROR)

    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    from torchft import Manager
    from torchft.local_sgd import DiLoCo
    from torchft.process_group import ProcessGroupGloo

    from streaming_muloco.data import EVAL_STREAM, TokenSplits, get_batch, load_tokens
    from streaming_muloco.fragments import assign_fragments
    from streaming_muloco.model import build_model

    ds = json.loads((REPO / args.ds_config).read_text())
    section, opt, sched = ds["streaming_muloco"], ds["optimizer"]["params"], ds["scheduler"]["params"]
    overrides = {k: v for k, v in (("n_embd", args.n_embd), ("n_layer", args.n_layer)) if v is not None}
    torch.manual_seed(args.seed)
    model = build_model(args.model, **overrides)
    block = model.cfg.block_size
    splits = TokenSplits.from_tokens(load_tokens(None, "uint16", model.cfg.vocab_size), 0.05, block)
    micro = args.micro_batch or ds["train_micro_batch_size_per_gpu"]

    names = [n for n, _ in model.named_parameters()]
    fragments = [fragment_module(model, f) for f in assign_fragments(names, args.fragments)]
    inner = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                              weight_decay=opt["weight_decay"])
    scheduler = WarmupCosineLR(inner, total_num_steps=args.steps, warmup_min_ratio=sched["warmup_min_ratio"],
                               warmup_num_steps=sched["warmup_num_steps"], cos_min_ratio=sched["cos_min_ratio"])
    outer = [torch.optim.SGD(f.parameters(), lr=section["outer_lr"], momentum=section["outer_momentum"],
                             nesterov=section["outer_nesterov"]) for f in fragments]

    def state_dict() -> dict:
        return {"model": model.state_dict(), "inner": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])

    # A replica group of one rank: its TCPStore is served here (torchft's Manager is a client of
    # it; torchrun would serve it in a multi-rank group). Other replicas reach it over the link.
    host = args.hostname or os.environ["MASTER_ADDR"]
    store = torch.distributed.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=300))
    manager = Manager(pg=pg, load_state_dict=load_state_dict, state_dict=state_dict,
                      min_replica_size=args.num_replicas, use_async_quorum=False, timeout=timedelta(seconds=300),
                      quorum_timeout=timedelta(seconds=300), connect_timeout=timedelta(seconds=60),
                      rank=0, world_size=1, replica_id=f"torchft_replica{args.replica_id}",
                      lighthouse_addr=args.lighthouse, hostname=host, store_addr=host, store_port=store.port,
                      init_sync=False)  # torchft's doc: False when every replica is seeded alike, as here

    timers = {"prepare_sync": 0.0, "perform_sync": 0.0}

    def timed(obj, name: str) -> None:  # time spent on the training thread inside torchft's sync calls
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t

        setattr(obj, name, wrapper)

    stream, tokens_per_step = args.replica_id, micro * block * args.num_replicas
    warm_until = min(5, args.steps // 5)
    t_warm = None
    # use_bucketization: one flat all-reduce per fragment (its default cap is 1 GiB), as ours sends
    # one buffer per fragment shard; the default (one all-reduce per tensor) would only add latency.
    with DiLoCo(manager, fragments, inner, outer, sync_every=args.sync_every, fragment_sync_delay=args.sync_delay,
                fragment_update_alpha=0.0, use_bucketization=True) as diloco:
        for f in diloco._fragments:
            timed(f, "prepare_sync")
            timed(f, "perform_sync")
        t_start = time.perf_counter()
        for step in range(1, args.steps + 1):
            x, y = get_batch(splits.train, micro, block, args.seed, stream, step - 1)
            loss = model(x, y)
            loss.backward()
            inner.step()  # DiLoCo's hooks run the outer loop
            scheduler.step()
            inner.zero_grad(set_to_none=True)
            if step == warm_until:
                t_warm = time.perf_counter()
        elapsed = time.perf_counter() - t_start
        steady = (args.steps - warm_until) * tokens_per_step / (time.perf_counter() - t_warm) if t_warm else None
        model.eval()
        with torch.no_grad():  # this replica's share of the eval batches, as train.py splits them
            losses = [model(*get_batch(splits.val, micro, block, args.seed, EVAL_STREAM, i)).float().item()
                      for i in range(args.replica_id, args.eval_batches * args.num_replicas, args.num_replicas)]
    result = {"library": "torchft", "replica_id": args.replica_id, "steps": args.steps, "seconds": elapsed,
              "tokens_per_s": args.steps * tokens_per_step / elapsed, "steady_tokens_per_s": steady,
              "eval_loss_sum": sum(losses), "eval_batches": len(losses),
              "sync_seconds_on_training_thread": timers["prepare_sync"] + timers["perform_sync"],
              "prepare_sync_s": timers["prepare_sync"], "perform_sync_s": timers["perform_sync"],
              "outer_commits": manager.current_step(), "num_params": model.num_params()}
    Path(args.out).write_text(json.dumps(result))
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
