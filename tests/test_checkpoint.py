"""checkpoint.py's file-level rules on a real filesystem: pre-flight, manifest shape, locating a
checkpoint, --keep-last pruning. The multi-rank save/resume paths are in test_checkpoint_multirank.py."""
import errno
import json
import os
import shutil

import pytest
import torch

from streaming_muloco.checkpoint import MANIFEST, _oserror_text, _prune, locate, preflight, read_manifest, torch_save
from streaming_muloco.errors import CheckpointError

GOOD = {"step": 6, "fingerprint": {"world_size": 2}, "files": {"replica0/a.pt": "0" * 64}}


def test_preflight_refuses_with_the_numbers_when_free_space_is_below_the_estimate(tmp_path):
    need = shutil.disk_usage(tmp_path).free + (1 << 30)
    with pytest.raises(CheckpointError) as e:
        preflight(tmp_path / "ck", need, "1,000 parameters x 2 replica(s)")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint directory '{tmp_path / 'ck'}' has ") and " free but one checkpoint of this " \
        "run needs about " in msg and "GiB (1,000 parameters x 2 replica(s)); make room" in msg, msg
    assert "--no-save" in msg


def test_preflight_names_the_directory_and_the_errno_text_when_it_cannot_write(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError) as e:
        preflight(blocker / "checkpoints", 1)
    assert str(e.value).startswith(f"checkpoint directory '{blocker / 'checkpoints'}' is not writable: "
                                   f"[Errno 20] Not a directory"), str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_during_torch_save_is_an_oserror_naming_errno_and_file():
    """torch.save given a path reports only 'unexpected pos'; through a file object the errno survives."""
    with pytest.raises(OSError) as e:
        torch_save({"w": torch.zeros(1 << 16)}, "/dev/full")
    assert e.value.errno == errno.ENOSPC
    assert _oserror_text(e.value) == "[Errno 28] No space left on device (at '/dev/full')"


def test_preflight_passes_and_leaves_nothing_behind(tmp_path):
    preflight(tmp_path / "ck", 1024)
    assert list((tmp_path / "ck").iterdir()) == []


@pytest.mark.parametrize("manifest, problem", [
    ({}, "the key 'step' is missing"),
    ([], "expected a JSON object, found list"),
    ({"step": 6, "fingerprint": {}}, "the key 'files' is missing"),
    ({**GOOD, "step": "6"}, "'step' must be an integer, found \"6\""),
    ({**GOOD, "step": True}, "'step' must be an integer, found true"),
    ({**GOOD, "fingerprint": None}, "'fingerprint' must be an object, found null"),
    ({**GOOD, "files": {"../../etc/passwd": "0" * 64}}, "file entry '../../etc/passwd' points outside"),
    ({**GOOD, "files": {"a.pt": 12}}, "file entry 'a.pt' has no sha256 digest (12)"),
])
def test_a_malformed_manifest_is_a_checkpoint_error_naming_the_file(tmp_path, manifest, problem):
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        read_manifest(tmp_path)
    assert str(e.value).startswith(f"checkpoint manifest '{tmp_path / MANIFEST}' is malformed: {problem}"), str(e.value)


def test_a_well_formed_manifest_reads_back(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(GOOD))
    assert read_manifest(tmp_path) == GOOD


def _complete(root, step):
    d = root / f"step{step}"
    d.mkdir(parents=True)
    (d / MANIFEST).write_text(json.dumps({**GOOD, "step": step}))
    return d


def test_locate_says_a_step_directory_has_no_manifest_instead_of_looking_for_latest(tmp_path):
    step = tmp_path / "step6"
    (step / "replica0").mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        locate(step)
    assert str(e.value).startswith(f"checkpoint '{step}' has no manifest.json: it is incomplete"), str(e.value)


def test_locate_follows_latest_and_refuses_a_checkpoints_dir_that_lost_it(tmp_path):
    assert locate(tmp_path / "nothing-here") is None
    assert locate(tmp_path) is None  # empty: nothing saved yet
    _complete(tmp_path, 3)
    six = _complete(tmp_path, 6)
    with pytest.raises(CheckpointError) as e:  # starting over would silently discard step6
        locate(tmp_path)
    assert "has no 'latest' file but holds complete checkpoints (step3, step6)" in str(e.value)
    (tmp_path / "latest").write_text("step6")
    assert locate(tmp_path) == six and locate(six) == six


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    for s in (3, 6, 9, 12, 15):
        _complete(tmp_path, s)
    (tmp_path / "step4").mkdir()  # incomplete: not a checkpoint, not ours to delete
    crashed = tmp_path / "step1.deleting"  # an earlier prune that was interrupted
    crashed.mkdir()
    (tmp_path / "latest").write_text("step9")  # a resumed run went back: step12/15 are newer
    _prune(tmp_path, 9, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step12", "step15", "step4", "step6", "step9"]
    _prune(tmp_path, 9, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step12", "step15", "step4", "step9"]
