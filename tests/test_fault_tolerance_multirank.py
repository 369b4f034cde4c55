"""Replicas as independent jobs (docs/design.md §6): kill, hang, restart, late join, equality.

Real processes throughout: a torchft Lighthouse, replica jobs of `python -m
streaming_muloco.train --replica-id k --lighthouse ...` (D=2 through launch/mpirun_local.sh),
gloo collectives on torchft's reconfigurable process groups. Every wait has a timeout.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from ft_harness import Lighthouse, Replica, start_first_then_others, train_args

pytestmark = pytest.mark.multirank


@pytest.fixture
def lighthouse2():
    lh = Lighthouse(min_replicas=2)
    yield lh
    lh.stop()


def traces(out: Path, k: int) -> dict[str, torch.Tensor]:
    return {f.name: torch.load(f) for f in sorted((out / f"trace{k}").glob("*.pt"))}


def syncs_after(step: int, names: list[str]) -> list[str]:
    return [n for n in names if int(n.split("_")[0][4:]) > step]


def assert_survivors(reps: list[Replica], kill_step: int) -> list[dict]:
    results = []
    for r in reps:
        assert r.wait() == [0] * len(r.procs), r.output()[-3000:]
        res = r.result()
        results.append(res)
        sizes = dict((s, n) for s, n in res["quorum_history"])
        assert max(sizes.values()) == 3 and sizes[max(sizes)] == 2, res["quorum_history"]
        assert res["drops"] == 1, res
        losses = dict((s, v) for s, v in res["history"]["train_loss"])
        assert losses[max(losses)] < losses[kill_step], losses  # it kept learning after the failure
    assert results[0]["theta_g_sha256"] == results[1]["theta_g_sha256"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(reps[0].out / "replica0" / "tb"))
    tb.Reload()
    sizes = [e.value for e in tb.Scalars("ft/quorum_size")]
    assert 3.0 in sizes and sizes[-1] == 2.0, sizes
    assert tb.Scalars("ft/drops")[-1].value == 1.0
    return results


def kill_once_all_joined(reps: list[Replica], victim: Replica, sig: int = signal.SIGKILL, rank: int | None = None,
                         at_least: int = 40) -> int:
    """Kill `victim` at a logged step >= `at_least` and >= 15 steps after every replica printed its
    first step, so a quorum of all of them has synced before the kill even when one launcher starts
    slowly (a late starter heals in and begins later). Returns that step."""
    for r in reps:
        r.wait_for_step(5)
    step = max(at_least, -(-(victim.current_step() + 15) // 5) * 5)
    assert step <= 200, f"the replicas joined too late for this test (kill would be at step {step})"
    victim.wait_for_step(step)
    victim.kill(sig, rank)
    return step


def survive_a_failure(tmp_path: Path, lighthouse: str, D: int = 1, extra: list[str] = (),
                      launchers: list[str] = ("env",) * 3, sig: int = signal.SIGKILL,
                      rank: int | None = None) -> list[dict]:
    """Three replica jobs of 300 steps; replica 2 (or one of its ranks) gets `sig` mid-run; replicas
    0 and 1 must finish as `assert_survivors` says. Returns their results."""
    args = train_args(3, 300, 2, extra)
    reps = start_first_then_others(lambda k: Replica(k, D, tmp_path, lighthouse, args, launchers[k]), 3)
    try:
        killed_at = kill_once_all_joined(reps, reps[2], sig, rank)
        if rank is not None:
            codes = reps[2].wait(timeout=120)  # its rank 0 ends on its own: the vote of its ranks fails
            assert codes[0] != 0, reps[2].output()[-3000:]
        return assert_survivors(reps[:2], kill_step=killed_at)
    finally:
        for r in reps:
            r.kill()


@pytest.mark.parametrize("D", [1, 2])
def test_kill_a_replica_and_the_others_finish(tmp_path, lighthouse2, D):
    # D=2: every replica under launch/mpirun_local.sh; D=1: replica 0 under launch/deepspeed_launch.sh,
    # replica 1 under torchrun, replica 2 as plain processes with the rendezvous variables set
    survive_a_failure(tmp_path, lighthouse2.address, D,
                      launchers=["mpirun"] * 3 if D == 2 else ["deepspeed", "torchrun", "env"])


def test_two_phase_compression_survives_a_kill(tmp_path, lighthouse2):
    """The quorum shrinks from 3 to 2: two-phase chunks (and their EF residuals) follow it."""
    two_phase = ["--set", "streaming_muloco.compression.method=\"linear\"", "--set", "streaming_muloco.compression.bits=4",
                 "--set", "streaming_muloco.compression.collective=\"two_phase\""]
    results = survive_a_failure(tmp_path, lighthouse2.address, extra=two_phase)
    assert results[0]["outer_state_bytes"]["error_feedback"] > 0


def test_one_dead_rank_ends_only_its_replica(tmp_path, lighthouse2):
    survive_a_failure(tmp_path, lighthouse2.address, D=2, rank=1)


def test_a_hung_replica_is_dropped_after_the_heartbeat_timeout(tmp_path, lighthouse2):
    survive_a_failure(tmp_path, lighthouse2.address, sig=signal.SIGSTOP)


def _joins_and_matches(tmp_path: Path, reps: list[Replica], joiner: Replica, steps: int, joined_after: int) -> None:
    for r in reps + [joiner]:
        codes = r.wait()
        assert codes and all(c == 0 for c in codes), (codes, r.output()[-3000:])
    res = [r.result() for r in reps + [joiner]]
    assert len({r["theta_g_sha256"] for r in res}) == 1, [r["theta_g_sha256"] for r in res]
    j = res[-1]
    assert j["heals"] and j["heals"][-1]["step"] >= joined_after, j["heals"]
    healed_at = j["heals"][-1]["step"]
    assert res[0]["joins"] >= 1
    theirs, mine = traces(tmp_path, 0), traces(tmp_path, joiner.k)
    after = syncs_after(healed_at, sorted(theirs))
    assert after and all(n in mine for n in after), (after, sorted(mine))
    for n in after:  # bit for bit at every sync once it has joined
        assert torch.equal(theirs[n], mine[n]), n


def test_a_restarted_replica_rejoins_bit_identical(tmp_path, lighthouse2):
    steps = 400
    args = lambda k: train_args(3, steps, 2, ["--trace-syncs", str(tmp_path / f"trace{k}")])  # noqa: E731
    reps = start_first_then_others(lambda k: Replica(k, 1, tmp_path, lighthouse2.address, args(k)), 3)
    try:
        reps[2].wait_for_step(40)
        reps[2].kill()
        reps[0].wait_for_step(60)
        again = Replica(2, 1, tmp_path / "again", lighthouse2.address, args(2))
        _joins_and_matches(tmp_path, reps[:2], again, steps, joined_after=60)
    finally:
        for r in reps:
            r.kill()


def test_a_replica_that_hung_and_came_back_is_healed_and_matches(tmp_path, lighthouse2):
    """SIGSTOP past the heartbeat timeout, then SIGCONT: the others went on without it, so it asks
    for a quorum of a sync they have passed; it is healed there (its step is behind theirs), jumps
    to their step and then equals them bit for bit."""
    steps = 400
    args = lambda k: train_args(3, steps, 2, ["--trace-syncs", str(tmp_path / f"trace{k}")])  # noqa: E731
    reps = start_first_then_others(lambda k: Replica(k, 1, tmp_path, lighthouse2.address, args(k)), 3)
    try:
        stopped_at = kill_once_all_joined(reps, reps[2], signal.SIGSTOP)
        reps[0].wait_for_step(stopped_at + 40)  # dropped (heartbeat timeout), the others went on
        reps[2].kill(signal.SIGCONT)
        _joins_and_matches(tmp_path, reps[:2], reps[2], steps, joined_after=stopped_at + 40)
        res = reps[2].result()
        assert res["steps_run"] < steps - 30, res["steps_run"]  # it jumped ahead instead of catching up
    finally:
        for r in reps:
            r.kill(signal.SIGCONT)
            r.kill()


ZERO3 = ["--set", "zero_optimization.stage=3", "--set", "+zero_optimization.reduce_scatter=false",
         "--set", "+zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.mark.parametrize("D, every, joiner", [
    # The joiner keeps its outer state in host memory (outer_state.py): the heal loads the peer's
    # theta_g and momentum into it, and it must still match its peers bit for bit.
    (1, [], ["--set", "streaming_muloco.outer_state_device=\"cpu\""]),
    # Every replica on ZeRO-3 with D=2 and every parameter partitioned: the heal writes theta_g
    # into the joiner's fp32 partitions and refreshes them as DeepSpeed's step does.
    (2, ZERO3, []),
], ids=["host_state_joiner", "zero3_d2"])
def test_a_replica_started_late_joins_the_same_way(tmp_path, lighthouse2, D, every, joiner):
    steps = 400 if D == 1 else 200
    args = lambda k: train_args(3, steps, 2, ["--trace-syncs", str(tmp_path / f"trace{k}"), *every])  # noqa: E731
    reps = [Replica(k, D, tmp_path, lighthouse2.address, args(k)) for k in range(2)]
    try:
        reps[0].wait_for_step(50)
        late = Replica(2, D, tmp_path, lighthouse2.address, args(2) + joiner)
        _joins_and_matches(tmp_path, reps, late, steps, joined_after=50)
    finally:
        for r in reps:
            r.kill()


@pytest.mark.parametrize("compression", [[], ["--set", "streaming_muloco.compression.method=\"linear\"",
                                             "--set", "streaming_muloco.compression.bits=4"]], ids=["fp32", "linear4_ef"])
def test_without_failures_replica_jobs_equal_the_single_job(tmp_path, compression):
    from multirank import run_ranks

    steps = 60
    common = ["--ds-config", "ds_configs/streaming_muloco_cpu.json", "--steps", str(steps), "--eval-every", str(steps),
              "--eval-batches", "2", "--no-save", "--set", "streaming_muloco.num_replicas=2",
              "--set", "streaming_muloco.sync_every=10", *compression]
    single = run_ranks(2, ["-m", "streaming_muloco.train", *common, "--out-dir", str(tmp_path / "single"),
                           "--trace-syncs", str(tmp_path / "single_trace")], timeout=300)
    assert single.ok, single.describe()
    lh = Lighthouse(min_replicas=2)
    try:
        args = lambda k: train_args(2, steps, 2, ["--trace-syncs", str(tmp_path / f"trace{k}"), *compression])  # noqa: E731
        reps = [Replica(k, 1, tmp_path, lh.address, args(k)) for k in range(2)]
        for r in reps:
            assert r.wait() == [0], r.output()[-3000:]
    finally:
        lh.stop()
    if compression:
        assert reps[0].result()["outer_state_bytes"]["error_feedback"] > 0  # the compressed path really ran
    ref = {f.name: torch.load(f) for f in sorted((tmp_path / "single_trace").glob("*.pt"))}
    assert len(ref) >= 5
    for k in range(2):
        mine = traces(tmp_path, k)
        assert sorted(mine) == sorted(ref)
        for n, t in ref.items():
            torch.testing.assert_close(mine[n], t, rtol=0, atol=1e-6)


def test_errors_one_line_and_no_hang(tmp_path):
    t0 = time.time()
    r = Replica(0, 1, tmp_path / "nolh", "127.0.0.1:9", train_args(2, 20, 1, [
        "--set", "streaming_muloco.fault_tolerance.timeout_s=3"]))
    assert r.wait(timeout=120) != [0]
    lines = [ln for ln in r.output().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot reach the coordinator at 127.0.0.1:9" in lines[0], r.output()[-3000:]
    assert "Traceback" not in r.output()
    assert time.time() - t0 < 110


def test_a_different_config_or_a_duplicate_id_is_refused(tmp_path):
    lh = Lighthouse(min_replicas=1)
    try:
        base = train_args(3, 400, 1)
        reps = [Replica(0, 1, tmp_path, lh.address, base)]
        reps[0].wait_for_step(20)
        other = Replica(1, 1, tmp_path / "other", lh.address, base + ["--set", "streaming_muloco.compression.method=\"linear\""])
        assert other.wait(timeout=180) != [0]
        lines = [ln for ln in other.output().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "config differs" in lines[0] and "compression" in lines[0], other.output()[-3000:]
        dup = Replica(0, 1, tmp_path / "dup", lh.address, base)
        assert dup.wait(timeout=180) != [0]
        lines = [ln for ln in dup.output().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "--replica-id 0 is already running" in lines[0], dup.output()[-3000:]
        assert reps[0].wait() == [0], reps[0].output()[-3000:]  # the original carries on to the end
    finally:
        lh.stop()


def test_whole_job_resume_from_per_replica_checkpoints(tmp_path, lighthouse2):
    """SIGKILL every replica after its step-30 checkpoint; --resume continues both from step 30."""
    def args(extra):
        return [a for a in train_args(2, 60, 2, extra) if a != "--no-save"]

    reps = [Replica(k, 1, tmp_path, lighthouse2.address, args(["--save-every", "30"])) for k in range(2)]
    try:
        for r in reps:
            r.wait_for_step(40)
        for r in reps:
            r.kill()
        assert all((tmp_path / f"replica{k}" / "checkpoints" / "step30" / "manifest.json").is_file() for k in range(2))
        again = [Replica(k, 1, tmp_path, lighthouse2.address, args(["--save-every", "30", "--resume"]))
                 for k in range(2)]
        for r in again:
            assert r.wait() == [0], r.output()[-3000:]
            assert "resumed from" in r.output() and "at inner step 30" in r.output()
        res = [r.result() for r in again]
        assert res[0]["theta_g_sha256"] == res[1]["theta_g_sha256"]
        assert res[0]["quorum_history"][0] == [30, 2]
    finally:
        for r in reps:
            r.kill()


def test_nan_policy_keeps_working_across_replica_jobs(tmp_path, lighthouse2):
    """The bad-numerics worker of test_nonfinite_multirank, each replica its own job."""
    import subprocess
    import sys

    from multirank import REPO, base_env, free_port

    procs = []
    for k in range(2):
        env = base_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())})
        procs.append(subprocess.Popen([sys.executable, "tests/workers/nan_worker.py", str(tmp_path), "skip",
                                       lighthouse2.address, str(k)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "non-finite loss" in outs[1] and "NaN/inf pseudo-gradient" in outs[1]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    def finite(d):
        return all(bool(torch.isfinite(t).all()) for t in d.values())

    assert not finite(r1["snapshots"][5]) and finite(r0["snapshots"][5])
    assert bool(torch.isfinite(r0["theta_g"]).all()) and torch.equal(r0["theta_g"], r1["theta_g"])
    assert all(torch.equal(r0["snapshots"][7][n], r1["snapshots"][7][n]) for n in r0["snapshots"][7])


@pytest.mark.parametrize("argv, message", [
    (["--min-replicas", "0"], "error: --min-replicas (0) must be >= 1 (see --help)"),
    ([], "error: the following arguments are required: --min-replicas (see --help)"),
    (["--min-replicas", "1", "--port", "PORT_IN_USE"], "error: cannot listen on [::]:"),
])
def test_lighthouse_cli_errors_are_one_line(argv, message):
    import socket
    import subprocess
    import sys

    from multirank import REPO, base_env

    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        argv = [a.replace("PORT_IN_USE", str(busy.getsockname()[1])) for a in argv]
        p = subprocess.run([sys.executable, "-m", "streaming_muloco.lighthouse", *argv], cwd=REPO, env=base_env(),
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
