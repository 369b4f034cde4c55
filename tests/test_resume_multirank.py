"""Exact resume after SIGKILL, verified checkpoints, and peers that die or hang (real ranks, gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from multirank import REPO, base_env, free_port, mpi_rank_pid, run_ranks, start_mpirun

pytestmark = pytest.mark.multirank

# K=2 replicas x D=1, H=4, P=2, tau=1: fragment 1 starts at steps 2, 6, 10 and finishes one step
# later, so the checkpoint at step 6 is taken while fragment 1 is in flight.
ARGS = ["-m", "streaming_muloco.train", "--ds-config", "ds_configs/streaming_muloco_cpu.json", "--steps", "12",
        "--log-every", "1", "--eval-every", "100", "--eval-batches", "2", "--save-every", "3",
        "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--set", "train_micro_batch_size_per_gpu=4", "--set", "streaming_muloco.sync_every=4",
        "--set", "streaming_muloco.num_fragments=2", "--set", "streaming_muloco.sync_delay=1",
        "--set", "streaming_muloco.comm.timeout_s=30"]


def start(n, argv, env=None):
    port = free_port()
    procs = []
    for rank in range(n):
        e = base_env(env)
        e.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"})
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def wait_for_line(proc, needle, timeout=300):
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"'{needle}' never appeared:\n{''.join(lines)[-3000:]}")


def kill_all(procs, sig=signal.SIGKILL):
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=60)


def losses(out):
    return {step: loss for step, loss in json.loads((out / "result.json").read_text())["history"]["train_loss"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    res = run_ranks(2, ARGS + ["--out-dir", str(out)], timeout=300)
    assert res.ok, res.describe()
    return out


HOST_STATE = ["--set", "streaming_muloco.outer_state_device=\"cpu\""]
ZERO3 = ["--set", "zero_optimization.stage=3", "--set", "+zero_optimization.reduce_scatter=false",
         "--set", "+zero_optimization.stage3_param_persistence_threshold=0"]


# Eager updates with tau = H = 4: at the step-6 checkpoint both fragments are in flight (0 since
# step 4, 1 since step 6), and each replica's theta_g holds its own eager term.
EAGER = ["--set", "streaming_muloco.eager_updates=true", "--set", "streaming_muloco.sync_delay=4"]


@pytest.mark.parametrize("extra", [[], HOST_STATE, ZERO3, EAGER],
                         ids=["default", "outer_state_in_host_memory", "zero3", "eager_two_in_flight"])
def test_sigkill_mid_overlapped_sync_then_resume_gives_bit_identical_losses(tmp_path, uninterrupted, extra):
    """Also with the outer state in host memory (compared with the default uninterrupted run,
    which it equals bit for bit), and under ZeRO-3 with every parameter partitioned (compared
    with an uninterrupted ZeRO-3 run)."""
    out = tmp_path / "killed"
    procs = start(2, ARGS + extra + ["--out-dir", str(out)])
    wait_for_line(procs[0], "step      8/12")
    kill_all(procs)  # both ranks, SIGKILL, after the step-6 checkpoint (fragment 1 in flight)
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    res = run_ranks(2, ARGS + extra + ["--out-dir", str(out), "--resume"], timeout=300)
    assert res.ok, res.describe()
    assert "resumed from" in res.outputs[0] and "at inner step 6" in res.outputs[0]
    reference = uninterrupted
    if extra in (ZERO3, EAGER):
        reference = tmp_path / "own_full"
        full_run = run_ranks(2, ARGS + extra + ["--out-dir", str(reference)], timeout=300)
        assert full_run.ok, full_run.describe()
    full, resumed = losses(reference), losses(out)
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    final = json.loads((out / "result.json").read_text())["final_eval_loss"]
    assert final == json.loads((reference / "result.json").read_text())["final_eval_loss"]


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_file_is_named_and_refused(tmp_path, uninterrupted):
    out = _copy_run(uninterrupted, tmp_path / "run")
    victim = next((out / "checkpoints" / "step12" / "replica1").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--resume"], timeout=300)
    assert res.returncodes[0] == 2
    assert f"error: checkpoint file '{victim}' is corrupt or truncated" in res.outputs[0]
    assert "Traceback" not in res.outputs[0]


@pytest.mark.parametrize("key, expected", [
    ("num_replicas", "it was saved with num_replicas=2 but this run has num_replicas=1"),
    ("num_fragments", "num_fragments=2 but this run has num_fragments=1")])
def test_resume_with_a_different_topology_or_fragment_count_is_refused(tmp_path, uninterrupted, key, expected):
    out = _copy_run(uninterrupted, tmp_path / "run")
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--resume", "--set", f"streaming_muloco.{key}=1"], timeout=300)
    assert res.returncodes[0] == 2
    assert expected in res.outputs[0]


PEER_ARGS = [a for a in ARGS] + ["--steps", "400", "--no-save", "--set", "streaming_muloco.sync_every=1",
                                 "--set", "streaming_muloco.num_fragments=1", "--set", "streaming_muloco.sync_delay=0",
                                 "--set", "streaming_muloco.comm.timeout_s=15"]


@pytest.mark.parametrize("victim, sig", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)])
def test_surviving_rank_exits_with_a_message_naming_the_peer_that_died_or_hangs(tmp_path, victim, sig):
    """H=1: every step has an outer sync, so the peer vanishes in the middle of the outer loop.

    The survivor's roll call over the rendezvous store names the rank that does not answer;
    when the victim is rank 0, which hosts that store, the store's silence names it."""
    procs = start(2, PEER_ARGS + ["--out-dir", str(tmp_path / "o")])
    wait_for_line(procs[0], "step     10/400")
    survivor = 1 - victim
    os.killpg(procs[victim].pid, sig)
    t0 = time.monotonic()
    try:
        out, _ = procs[survivor].communicate(timeout=120)
    finally:
        kill_all(procs)
    assert procs[survivor].returncode == 1, out[-3000:]
    assert time.monotonic() - t0 < 100
    assert f"error: rank {survivor}: a collective failed during" in out
    assert "restart every rank with --resume" in out
    if victim == 1:
        assert f"Rank 1 (replica 1, shard 0, pid {procs[1].pid} on " in out, out[-3000:]
        assert "did not answer a roll call within 5 s: dead, stopped or hung" in out
    else:
        assert "The rendezvous store hosted by rank 0 (127.0.0.1) does not answer (" in out, out[-3000:]
        assert "rank 0 died, is stopped or hangs" in out


def test_under_mpirun_a_hung_peer_of_the_mpi_backend_is_named_by_the_roll_call(tmp_path):
    """MPI_Test cannot say which peer is missing; the deadline stops the wait, and the roll
    call over torch.distributed's store (which exists under mpirun too) names the rank."""
    pytest.importorskip("mpi4py")
    job = start_mpirun(2, PEER_ARGS + ["--set", "streaming_muloco.comm.backend=mpi", "--out-dir", str(tmp_path / "o")],
                       mpi_args=["-x", "PYTHONUNBUFFERED=1"])
    try:
        wait_for_line(job, "step     10/400")
        victim = mpi_rank_pid(job.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:  # prterun makes each rank a session leader: kill them by pid
            for pid in filter(None, (mpi_rank_pid(job.pid, r) for r in range(2))):
                os.kill(pid, signal.SIGKILL)
        kill_all([job])
    assert job.returncode == 1, out[-3000:]
    assert ("error: rank 0: a collective failed during outer sync after inner step" in out and
            "MPI all_reduce over the outer group (ranks [0, 1]) did not finish within comm.timeout_s=15s. "
            f"Rank 1 (replica 1, shard 0, pid {victim} on " in out), out[-3000:]
    assert "did not answer a roll call within 5 s: dead, stopped or hung; restart every rank with --resume" in out
