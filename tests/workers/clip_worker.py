"""One rank of the gradient-clipping-with-Muon check (2 ranks = one replica of D=2).

    python tests/workers/clip_worker.py OUT_DIR

Every rank feeds the same batch, so the replica's averaged gradient is that batch's gradient,
which rank 0 also computes with plain torch on an identical model copy. Per ZeRO stage (1, 2, 3)
and gradient accumulation (1, 2):
- "spike": the loss is multiplied by 1000 at the first step and `gradient_clipping` is 1.0.
  After that step each optimizer moment is (1 - beta) x the gradient the optimizer received
  (Muon's momentum buffer, AdamW's exp_avg), read back in full from every rank's partition
  and saved with the torch gradient and the betas.
- "loose" / "off": 3 steps with `gradient_clipping` 1e6 (never reached) and 0; the parameters
  after each step are saved for a bitwise comparison.
"""
import copy
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import streaming_muloco
from streaming_muloco.data import get_batch, load_tokens
from streaming_muloco.model import build_model

SPIKE = 1000.0


def config(stage: int, gas: int, clip: float) -> dict:
    # ZeRO-3: Muon needs reduce_scatter off; threshold 0 partitions every parameter in use too.
    zero = {"stage": stage} if stage < 3 else {"stage": 3, "reduce_scatter": False,
                                               "stage3_param_persistence_threshold": 0}
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
            "zero_optimization": zero, "steps_per_print": 10 ** 6,
            "optimizer": {"type": "Muon", "params": {"muon_lr": 0.02, "adam_lr": 1e-3, "momentum": 0.95,
                                                     "weight_decay": 0.0, "torch_adam": True}},
            "streaming_muloco": {"enabled": False}}


def full_param_state(zero, p: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The whole parameter's slice of a flat per-partition optimizer state, summed over the
    replica's ranks (each adds the elements it owns). DeepSpeed's safe_get_full_optimizer_state
    does this for states it linked, which Muon's momentum (created later) is not."""
    full = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        full[lp.start: lp.start + lp.numel] = flat.narrow(0, hp.start, hp.numel)
    dist.all_reduce(full, group=zero.dp_process_group)
    return full.view(p.shape)


def zero3_moments(zero, names: dict, moments: dict, beta_of: dict) -> None:
    """ZeRO-3 keeps every optimizer state like the fp32 partitions: parameter p's slice of
    rank r's flat state is at grad_position, and covers elements [r*n, (r+1)*n) of p."""
    rank, world = dist.get_rank(zero.dp_process_group), dist.get_world_size(zero.dp_process_group)
    for i, group in enumerate(zero.fp16_groups):
        flat_param = zero.fp32_partitioned_groups_flat[i]
        use_muon = bool(zero.sub_groups_using_muon[i])
        settings = next(g for g in zero.optimizer.param_groups if bool(g["use_muon"]) is use_muon)
        if use_muon:
            in_memory = getattr(zero, "muon_momentum_buffer_partitioned_groups_flat", {}) or {}
            state = in_memory.get(i) if i in in_memory else zero.optimizer.state[flat_param]["momentum_buffer"]
        else:
            state = zero.optimizer.state[flat_param]["exp_avg"]
        for p in group:
            _, offset, n = zero.grad_position[zero.get_param_id(p)]
            full = torch.zeros(n * world, dtype=torch.float32, device=state.device)
            full[rank * n:(rank + 1) * n] = state.narrow(0, offset, n)
            dist.all_reduce(full, group=zero.dp_process_group)
            moments[names[id(p)]] = full[:p.ds_numel].view(p.ds_shape)
            beta_of[names[id(p)]] = settings["momentum"] if use_muon else settings["betas"][0]


def _muon_offsets(params_in_partition: list) -> dict:
    """DeepSpeed ZeRO-1/2 keeps Muon's momentum for the *whole* of each matrix that overlaps a
    rank's partition (Newton-Schulz needs the full matrix), one after another in that order."""
    offsets, at = {}, 0
    for p in params_in_partition:
        offsets[id(p)] = at
        at += p.numel()
    return offsets


def full_muon_momentum(zero, p: torch.Tensor, flat: torch.Tensor, offsets: dict) -> torch.Tensor:
    """A matrix's Muon momentum, averaged over the ranks that hold it (they hold equal copies)."""
    full = torch.zeros(p.numel() + 1, dtype=torch.float32, device=flat.device)
    if id(p) in offsets:
        full[:-1] = flat.narrow(0, offsets[id(p)], p.numel())
        full[-1] = 1.0  # count of holders
    dist.all_reduce(full, group=zero.dp_process_group)
    return (full[:-1] / full[-1]).view(p.shape)


def micro_batches(tokens, gas: int, step: int) -> list:
    return [get_batch(tokens, 4, 32, seed=3, stream=0, step=step * gas + m) for m in range(gas)]


def spike(out: Path, tokens, stage: int, gas: int) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", block_size=32)
    twin = copy.deepcopy(model)
    engine, _, _, _ = streaming_muloco.initialize(model=model, config=config(stage, gas, 1.0))
    batches = micro_batches(tokens, gas, 0)
    for x, y in batches:
        (twin(x, y) * SPIKE / gas).backward()  # DeepSpeed divides each micro-batch's loss by gas
        loss = engine(x, y) * SPIKE
        engine.backward(loss)
        engine.step()
    zero = engine.optimizer
    moments, beta_of = {}, {}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if stage == 3:
        zero3_moments(zero, names, moments, beta_of)
    for i, group in enumerate(zero.bit16_groups if stage < 3 else []):
        settings = zero.optimizer.param_groups[i]
        state = zero.optimizer.state[zero.single_partition_of_fp32_groups[i]]
        flat = state["momentum_buffer" if settings["use_muon"] else "exp_avg"]
        muon_offsets = _muon_offsets(zero.params_in_partition[i]) if settings["use_muon"] else None
        for p in group:
            moments[names[id(p)]] = (full_muon_momentum(zero, p, flat, muon_offsets) if settings["use_muon"]
                                     else full_param_state(zero, p, flat))
            beta_of[names[id(p)]] = settings["momentum"] if settings["use_muon"] else settings["betas"][0]
    if dist.get_rank() == 0:
        torch.save({"moments": moments, "beta": beta_of, "grad": {n: p.grad.clone() for n, p in twin.named_parameters()},
                    "norm": float(engine.muon_grad_clipper.last_norm), "clipped": engine.muon_grad_clipper.clipped_steps,
                    "muon": engine.muon_param_names()},
                   out / f"spike_z{stage}_gas{gas}.pt")
    dist.barrier()


def params_after_steps(out: Path, tokens, stage: int, clip: float, name: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", block_size=32)
    engine, _, _, _ = streaming_muloco.initialize(model=model, config=config(stage, 1, clip))
    snapshots = []
    for step in range(3):
        (x, y), = micro_batches(tokens, 1, step)
        engine.backward(engine(x, y))
        engine.step()
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            snapshots.append({n: p.detach().clone() for n, p in params})
    if dist.get_rank() == 0:
        torch.save(snapshots, out / f"{name}_z{stage}.pt")
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    tokens = load_tokens(None)[:100_000]
    for stage in (1, 2, 3):
        for gas in (1, 2):
            spike(out, tokens, stage, gas)
        params_after_steps(out, tokens, stage, 1e6, "loose")
        params_after_steps(out, tokens, stage, 0.0, "off")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    streaming_muloco.exit_process(0)
