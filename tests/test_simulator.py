"""The single-process K-replica simulator computes what a real 2-process DeepSpeed job computes.

The quality sweep (benchmarks/quality_sweep.py) trusts the simulator, so this test pins it to
DeepSpeed itself: Streaming MuLoCo (K=2, D=1, H=4, P=2, tau=1, Muon + WarmupCosineLR),
DiLoCo (AdamW with weight decay, gradient clipping and accumulation, ZeRO-2), 2-rank DP-AdamW
and MuLoCo with 2-bit two-phase error-feedback compression, each run both ways on the same
tiny model and data. Parameters, losses, outer-step counts and bytes on the
wire must agree.
"""
import contextlib
import json
from pathlib import Path

import pytest
import torch

from multirank import run_ranks
from streaming_muloco.sim.inprocess import InProcessBackend, InProcessGroup
from streaming_muloco.sim import simulate
from workers.sim_agreement_worker import BLOCK, splits
from workers.ns_precision import newton_schulz_fp32

pytestmark = pytest.mark.multirank

STEPS, H, SEED, MICRO, EVAL_EVERY, EVAL_BATCHES = 12, 4, 7, 4, 4, 2
SNAP_STEPS = [1, H - 1, H, H + 1, 2 * H, STEPS]
SCHED = {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 3, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1,
                                              "total_num_steps": STEPS}}
MUON = {"type": "Muon", "params": {"muon_lr": 0.02, "adam_lr": 1e-2, "momentum": 0.95, "betas": [0.9, 0.95],
                                   "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True}}
ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                     "torch_adam": True}}


def ds_config(opt: dict, stage: int, clip: float, section: dict | None, accum: int = 1) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "optimizer": opt, "scheduler": SCHED, "steps_per_print": 10 ** 6}
    if section is not None:
        cfg["streaming_muloco"] = section
    return cfg


SCENARIOS = {
    "stream_muloco": ds_config(MUON, 1, 0.0, {"num_replicas": 2, "sync_every": H, "num_fragments": 2,
                                              "sync_delay": 1, "outer_lr": 0.7, "outer_momentum": 0.9}),
    # clip 0.05 is below this model's gradient norm, so clipping really scales every step.
    "diloco_clip_accum": ds_config(ADAMW, 2, 0.05, {"num_replicas": 2, "sync_every": H, "outer_lr": 0.8,
                                                    "outer_momentum": 0.8}, accum=2),
    "dp_adamw": ds_config(ADAMW, 1, 0.05, None),
    # Muon with clipping: DeepSpeed with grad_clip.py's hook against the simulator, which clips the
    # raw gradient before MuonWithAuxAdam.step runs Muon on it (the reference semantics). The clip
    # factor differs between the two by an ulp (partition sums), which fp16 Newton-Schulz turns into
    # 1e-4..5e-3 within 12 steps; in fp32 it stays below 2e-6 (NS_FP32).
    "muloco_clip_accum": ds_config(MUON, 2, 0.05, {"num_replicas": 2, "sync_every": H, "outer_lr": 0.7,
                                                   "outer_momentum": 0.9}, accum=2),
    # The exchange's compression and error feedback run inside OuterSync on both sides too.
    "muloco_2bit_ef_two_phase": ds_config(MUON, 1, 0.0, {
        "num_replicas": 2, "sync_every": H, "outer_lr": 0.7, "outer_momentum": 0.9,
        "compression": {"method": "statistical", "bits": 2, "error_feedback": True, "collective": "two_phase"}}),
}


NS_FP32 = {"muloco_clip_accum"}  # scenarios whose Newton-Schulz runs in fp32 on both sides (ns_precision.py)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out: Path = tmp_path_factory.mktemp("sim")
    spec = [{"name": n, "ds_config": c, "steps": STEPS, "seed": SEED, "micro": MICRO, "eval_every": EVAL_EVERY,
             "eval_batches": EVAL_BATCHES, "snap_steps": SNAP_STEPS, "ns_fp32": n in NS_FP32}
            for n, c in SCENARIOS.items()]
    (out / "scenarios.json").write_text(json.dumps(spec))
    res = run_ranks(2, ["tests/workers/sim_agreement_worker.py", str(out / "scenarios.json"), str(out)], timeout=300)
    assert res.ok, res.describe()
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)] for name in SCENARIOS}


def run_simulator(name: str, replica_threads: bool = False) -> tuple[dict, dict[int, list[dict]]]:
    snaps: dict[int, list[dict]] = {}

    def keep(step: int, models: list) -> None:
        if step in SNAP_STEPS:
            snaps[step] = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]

    with newton_schulz_fp32() if name in NS_FP32 else contextlib.nullcontext():
        res = simulate(SCENARIOS[name], steps=STEPS, seed=SEED, micro_batch=MICRO, block_size=BLOCK,
                       model_overrides={"n_embd": 32, "n_head": 2}, splits=splits(), eval_every=EVAL_EVERY,
                       eval_batches=EVAL_BATCHES, log_every=1, dp_world=2, on_step=keep,
                       replica_threads=replica_threads)
    return res, snaps


def max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_simulator_matches_real_deepspeed_job(deepspeed_runs: dict[str, list[dict]], name: str) -> None:
    ranks = deepspeed_runs[name]
    res, snaps = run_simulator(name)
    for step in SNAP_STEPS:
        for r, data in enumerate(ranks):
            model = snaps[step][r] if len(snaps[step]) == 2 else snaps[step][0]  # DP: one model, both ranks
            diff = max_diff(data["snapshots"][step], model)
            assert diff < 2e-5, (name, step, r, diff)
    ds_losses = [sum(r["losses"][s] for r in ranks) / 2 for s in range(STEPS)]
    assert [s for s, _ in res["train_loss"]] == list(range(1, STEPS + 1))
    for (step, sim), ds in zip(res["train_loss"], ds_losses):
        assert abs(sim - ds) < 1e-4, (name, step, sim, ds)
    assert [s for s, _ in res["eval_loss"]] == [s for s, _ in ranks[0]["eval"]]
    for (step, sim), (_, ds) in zip(res["eval_loss"], ranks[0]["eval"]):
        assert abs(sim - ds) < 1e-4, (name, step, sim, ds)
    if name != "dp_adamw":
        assert res["outer_steps"] == [r["info"]["outer_steps"] for r in ranks]
        assert res["bytes_sent_per_replica"] == [r["info"]["bytes_sent"] for r in ranks]
        assert min(res["outer_steps"]) > 0 and min(res["bytes_sent_per_replica"]) > 0


def test_in_process_collectives_sum_in_rank_order_and_count_wire_bytes() -> None:
    group = InProcessGroup(3)
    comms = [InProcessBackend(group, r) for r in range(3)]
    xs = [torch.full((4,), float(r + 1)) for r in range(3)]
    handles = [c.all_reduce_sum(x) for c, x in zip(comms, xs)]
    assert all(h.wait() is x for h, x in zip(handles, xs))
    assert all(torch.equal(x, torch.full((4,), 6.0)) for x in xs)
    gathered = [c.all_gather(torch.tensor([r])) for r, c in enumerate(comms)]
    assert [t.item() for t in gathered[2].wait()] == [0, 1, 2]
    a2a = [c.all_to_all([torch.tensor([10 * r + j]) for j in range(3)]) for r, c in enumerate(comms)]
    assert [t.item() for t in a2a[1].wait()] == [1, 11, 21]
    # all_reduce 16 B: 2*(3-1)/3*16 = 21; all_gather 8 B: 2*8; all_to_all 24 B: 2/3*24
    assert [c.bytes_sent for c in comms] == [21 + 16 + 16] * 3


def test_waiting_before_every_replica_launched_is_a_clear_error() -> None:
    group = InProcessGroup(2)
    comms = [InProcessBackend(group, r) for r in range(2)]
    handle = comms[0].all_reduce_sum(torch.ones(2))
    with pytest.raises(RuntimeError, match=r"ranks \[1\] have not posted"):
        handle.wait()
    comms[1].all_reduce_sum(torch.ones(2)).wait()
    with pytest.raises(RuntimeError, match="same order"):
        comms[0].all_gather(torch.ones(2))
        comms[1].all_reduce_sum(torch.ones(2))


def test_one_thread_per_replica_gives_the_same_run() -> None:
    """The threaded mode (for exchanges that launch inside wait()) changes nothing else."""
    plain, plain_snaps = run_simulator("stream_muloco")
    threaded, threaded_snaps = run_simulator("stream_muloco", replica_threads=True)
    assert plain["eval_loss"] == threaded["eval_loss"]
    for step in SNAP_STEPS:
        assert all(max_diff(a, b) == 0.0 for a, b in zip(plain_snaps[step], threaded_snaps[step]))
