"""Checkpoint failures a user meets, on 2 real ranks (gloo): --keep-last, a missing or malformed
manifest, a changed --steps, an unwritable or full checkpoint directory before training and at
save time. Every error test checks the printed line and every rank's exit code."""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess

import pytest

from multirank import run_ranks
from test_resume_multirank import ARGS, kill_all, start, wait_for_line

pytestmark = pytest.mark.multirank


def _ckpt_size(step_dir):
    return sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """ARGS saves at steps 3, 6, 9 and 12; --keep-last 2 leaves step9 and step12."""
    out = tmp_path_factory.mktemp("kept")
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--keep-last", "2"], timeout=300)
    assert res.ok, res.describe()
    return out


def test_keep_last_deletes_older_complete_checkpoints_after_each_commit(kept):
    ck = kept / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step12", "step9"]
    assert (ck / "latest").read_text() == "step12"
    for step in ("step9", "step12"):
        manifest = json.loads((ck / step / "manifest.json").read_text())
        assert manifest["step"] == int(step[4:]) and manifest["files"]


def test_the_space_estimate_bounds_a_real_checkpoint(kept):
    from streaming_muloco.config import split_config
    from streaming_muloco.engine import estimate_checkpoint_nbytes
    from streaming_muloco.model import build_model
    from streaming_muloco.train import load_ds_config, parse_args

    args = parse_args(ARGS[2:] + ["--out-dir", str(kept)])
    ds_config, cfg = split_config(load_ds_config(args))
    model = build_model(args.model, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size)
    estimate, _ = estimate_checkpoint_nbytes(model, ds_config, cfg, cfg.num_replicas)
    actual = _ckpt_size(kept / "checkpoints" / "step12")  # taken with a fragment in flight
    assert actual <= estimate <= 2 * actual + (1 << 20), (actual, estimate)


def _copy(kept, tmp_path):
    return shutil.copytree(kept, tmp_path / "run")


def _assert_refused(res, line):
    """Exit code 2 on every rank, the error line on rank 0, and no traceback or peer-failure advice."""
    assert res.returncodes == [2, 2], res.describe()
    assert line in res.outputs[0], res.describe()
    for out in res.outputs:
        assert "Traceback" not in out and "restart every rank" not in out, out[-3000:]


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_step_directory_with_a_missing_or_malformed_manifest_is_named(tmp_path, kept, damage):
    out = _copy(kept, tmp_path)
    step = out / "checkpoints" / "step12"
    manifest = step / "manifest.json"
    if damage == "missing":
        manifest.unlink()
        line = f"error: checkpoint '{step}' has no manifest.json: it is incomplete (the save that wrote it did not finish)"
    else:
        manifest.write_text("{}")
        line = f"error: checkpoint manifest '{manifest}' is malformed: the key 'step' is missing"
    _assert_refused(run_ranks(2, ARGS + ["--out-dir", str(out), "--resume", str(step)], timeout=300), line)


def test_resuming_with_a_different_steps_is_refused_with_both_values(tmp_path, kept):
    out = _copy(kept, tmp_path)
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--resume", "--steps", "15"], timeout=300)
    _assert_refused(res, f"error: cannot resume from '{out / 'checkpoints' / 'step12'}': it was saved with "
                         f"scheduler.params.total_num_steps=12 but this run has scheduler.params.total_num_steps=15; "
                         f"the LR schedule's length changed")
    assert "--set scheduler.params.total_num_steps=N" in res.outputs[0]


def test_an_explicit_schedule_length_extends_a_run_on_purpose(tmp_path, kept):
    out = _copy(kept, tmp_path)
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--resume", "--steps", "15",
                               "--set", "scheduler.params.total_num_steps=20"], timeout=300)
    assert res.ok, res.describe()
    assert f"resumed from {out / 'checkpoints' / 'step12'} at inner step 12" in res.outputs[0]
    assert "scheduler.params.total_num_steps changed on purpose: saved 12, now 20" in res.outputs[0]
    history = json.loads((out / "result.json").read_text())["history"]["train_loss"]
    assert [s for s, _ in history] == [13, 14, 15]


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path, kept):
    out = _copy(kept, tmp_path)
    res = run_ranks(2, ARGS + ["--out-dir", str(out), "--resume"], timeout=300)
    _assert_refused(res, f"error: --steps (12) must be larger than the step of the checkpoint resumed from "
                         f"('{out / 'checkpoints' / 'step12'}' is at inner step 12): there is nothing left to train")


# ---- an unwritable or full checkpoint directory -------------------------------------------
@pytest.fixture
def fs(tmp_path):
    """Mount helpers (root only: permission bits do not stop root, a read-only or tiny tmpfs
    does); unmounted at teardown."""
    mounted = []

    def tmpfs(path, size, ro=False):
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs")
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)

    def make_readonly(path):
        """Unwritable the way this process can be stopped; returns the errno text the kernel gives.
        Mode 0555 stops a user; root (CAP_DAC_OVERRIDE) ignores it, so for root the directory
        becomes a read-only tmpfs instead."""
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        try:
            (path / "probe").write_text("x")
        except PermissionError:
            return "[Errno 13] Permission denied"
        (path / "probe").unlink()
        path.chmod(0o755)
        if path not in mounted:
            tmpfs(path, "8m")
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return "[Errno 30] Read-only file system"

    yield type("FS", (), {"tmpfs": staticmethod(tmpfs), "make_readonly": staticmethod(make_readonly)})
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    for p in tmp_path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_dir():
                p.chmod(0o755)


def test_an_unwritable_out_dir_is_refused_before_any_process_group_starts(tmp_path, fs):
    out = tmp_path / "run"
    errno_text = fs.make_readonly(out / "checkpoints")
    res = run_ranks(2, ARGS + ["--out-dir", str(out)], timeout=300)
    _assert_refused(res, f"error: checkpoint directory '{out / 'checkpoints'}' is not writable: {errno_text}")
    assert "step      1/12" not in res.outputs[0]


def test_a_disk_without_room_for_one_checkpoint_is_refused_with_the_numbers(tmp_path, fs):
    out = tmp_path / "run"
    fs.tmpfs(out / "checkpoints", "512k")
    res = run_ranks(2, ARGS + ["--out-dir", str(out)], timeout=300)
    _assert_refused(res, f"error: checkpoint directory '{out / 'checkpoints'}' has 512.0 KiB free but one checkpoint "
                         f"of this run needs about 3.2 MiB (41,120 parameters x 2 replica(s)")
    assert "step      1/12" not in res.outputs[0]


def _fill(directory):
    """Write zeros until the filesystem says ENOSPC."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


@pytest.mark.parametrize("how", ["full", "readonly"])
def test_a_checkpoint_that_cannot_be_written_is_one_checkpoint_error_on_every_rank(tmp_path, fs, how):
    """The directory passes the pre-flight, then fills up or turns read-only during training:
    the save at step 20 fails on one rank or both, and every rank stops with the same
    CheckpointError instead of a peer-failure message."""
    out = tmp_path / "run"
    ck = out / "checkpoints"
    if how == "full":
        fs.tmpfs(ck, "6m")  # the estimate (3.2 MiB) fits
    procs = start(2, ARGS + ["--out-dir", str(out), "--steps", "40", "--save-every", "20"])
    try:
        wait_for_line(procs[0], "step      1/40")
        for p in procs:  # hold both ranks still while the disk changes under them
            os.killpg(p.pid, signal.SIGSTOP)
        errno_text = f"[Errno 28] No space left on device (at '{ck / 'step20.tmp'}/" if how == "full" else \
            fs.make_readonly(ck)
        if how == "full":
            _fill(ck)
        for p in procs:
            os.killpg(p.pid, signal.SIGCONT)
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [2, 2], outs
    assert f"error: cannot write checkpoint step20 into '{ck}' (rank " in outs[0], outs[0][-3000:]
    assert errno_text in outs[0] and "then continue with --resume" in outs[0]
    for o in outs:
        assert "Traceback" not in o and "restart every rank" not in o, o[-3000:]
    assert not (ck / "step20").exists() and not (ck / "latest").exists()
