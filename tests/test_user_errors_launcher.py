"""One `error:` line per job under the real launchers, however many ranks raise the error.

Every rank of a job reads the same config and arguments, so every rank raises the same
pre-flight error at about the same time; the launcher tears the job down as soon as the first
rank exits. These runs go through launch/mpirun_local.sh and launch/deepspeed_launch.sh as a
user would, and count the `error:` lines in everything the job printed.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multirank import REPO, base_env, free_port

pytestmark = pytest.mark.multirank

VENV_BIN = str(Path(sys.executable).parent)


def _env() -> dict:
    return base_env({"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")})


def _job(cmd: list[str], timeout: float = 180) -> tuple[int, str, list[str]]:
    """(exit code, all output, the `error:` lines) of one launcher job."""
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    return proc.returncode, out, [line for line in out.splitlines() if line.startswith("error:")]


def _null_section_config(tmp_path) -> str:
    cfg = json.loads((REPO / "ds_configs" / "muloco_cpu.json").read_text())
    cfg["streaming_muloco"] = None
    path = tmp_path / "null_section.json"
    path.write_text(json.dumps(cfg))
    return str(path)


NULL_SECTION_LINE = ("error: streaming_muloco is null: for plain DeepSpeed data parallel remove the section, or "
                     "write \"streaming_muloco\": {\"enabled\": false}")


def test_mpirun_config_error_raised_by_all_4_ranks_is_printed_once(tmp_path):
    rc, out, errors = _job(["bash", "launch/mpirun_local.sh", "4", _null_section_config(tmp_path),
                            "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and errors == [NULL_SECTION_LINE], out
    assert "Traceback" not in out


def test_mpirun_argument_error_is_printed_once_without_usage(tmp_path):
    rc, out, errors = _job(["bash", "launch/mpirun_local.sh", "4", "ds_configs/muloco_cpu.json", "--steps", "0",
                            "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and errors == ["error: --steps (0) must be >= 1 (see --help)"], out
    assert "usage:" not in out and "Traceback" not in out


def test_mpirun_resume_from_a_step_directory_without_manifest_prints_its_line_every_time(tmp_path):
    # Once intermittent (no line in 4 of 8 runs): a rank other than 0 exited first and mpirun
    # killed rank 0 before it printed. Repeated because the failure was a race.
    step = tmp_path / "o" / "checkpoints" / "step6"
    (step / "replica0").mkdir(parents=True)
    for attempt in range(3):
        rc, out, errors = _job(["bash", "launch/mpirun_local.sh", "4", "ds_configs/muloco_cpu.json",
                                "--out-dir", str(tmp_path / "o"), "--resume", str(step)])
        assert rc == 2 and len(errors) == 1, f"attempt {attempt}:\n{out}"
        assert errors[0].startswith(f"error: checkpoint '{step}' has no manifest.json: it is incomplete")


def _mpirun_torchrun_env(n: int, train_args: str, extra_env: dict | None = None) -> list[str]:
    """mpirun of n real training ranks (bash expands `train_args` per rank) that rendezvous on a
    free port: with torchrun-style variables DeepSpeed skips its MPI discovery, which would pick
    its fixed default port 29500, shared by parallel test jobs."""
    mpirun = shutil.which("mpirun", path=_env()["PATH"])
    rank_cmd = ("RANK=$OMPI_COMM_WORLD_RANK LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE "
                f"exec python -m streaming_muloco.train {train_args}")
    exports = [a for key, value in (extra_env or {}).items() for a in ("-x", f"{key}={value}")]
    return [mpirun, "--oversubscribe", "--bind-to", "none", "-x", "PATH", "-x", "DS_ACCELERATOR",
            "-x", "OMP_NUM_THREADS", "-x", "TORCHDYNAMO_DISABLE", "-x", "PYTHONWARNINGS", *exports,
            "-x", f"MASTER_PORT={free_port()}", "-x", "MASTER_ADDR=127.0.0.1", "-np", str(n), "bash", "-c", rank_cmd]


def _private_torch_extensions(tmp_path) -> str:
    """A private copy of torch's JIT-extension cache (DeepSpeed's shm op lives there).

    Loading the op takes a lock file in that cache; a rank killed while it holds the lock (mpirun
    kills waiting ranks at any instant) leaves the lock behind, and every later DeepSpeed start
    on the machine waits for it forever. Ranks that this test has killed mid-start use a copy.
    """
    from torch.utils.cpp_extension import get_default_build_root

    src = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    dst = tmp_path / "torch_extensions"
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    return str(dst)


def test_mpirun_error_raised_by_one_rank_only_is_printed_by_that_rank(tmp_path):
    # Ranks 0-2 pass pre-flight and wait at the rendezvous; rank 3 alone cannot read its data
    # (a file missing on one node). It waits out the grace period, then says it itself.
    missing = tmp_path / "missing.bin"
    cmd = _mpirun_torchrun_env(4, f"--ds-config ds_configs/muloco_cpu.json --out-dir {tmp_path / 'o'} --no-save "
                                  f"--steps 1 $([ $OMPI_COMM_WORLD_RANK = 3 ] && echo --data {missing})",
                               extra_env={"TORCH_EXTENSIONS_DIR": _private_torch_extensions(tmp_path)})
    rc, out, errors = _job(cmd)
    assert rc == 2 and errors == [f"error: rank 3: data path '{missing}' does not exist or is not a file; pass "
                                  f"--data=<file.txt|file.bin> or --data=shakespeare for the bundled corpus"], out
    assert "Traceback" not in out


def test_deepspeed_launcher_config_error_raised_by_all_ranks_is_printed_once(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=4\n")
    rc, out, errors = _job(["bash", "launch/deepspeed_launch.sh", str(hostfile), _null_section_config(tmp_path),
                            "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and errors == [NULL_SECTION_LINE], out
    assert "Traceback" not in out




def test_mpirun_error_every_rank_raises_after_deepspeed_started_is_printed_once(tmp_path):
    # A manifest that is not JSON passes pre-flight (it exists); rank 0 reads it inside
    # checkpoint.load and broadcasts the verdict, so all 4 ranks raise the same CheckpointError
    # at once, after process groups exist: the race the grace wait of ranks 1-3 is there for.
    step = tmp_path / "o" / "checkpoints" / "step6"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{truncated")
    rc, out, errors = _job(_mpirun_torchrun_env(4, f"--ds-config ds_configs/muloco_cpu.json --out-dir {tmp_path / 'o'} "
                                                   f"--resume {step}"), timeout=300)
    assert rc == 2 and errors == [f"error: checkpoint manifest '{step / 'manifest.json'}' is corrupt (not valid "
                                  f"JSON)"], out
    assert "Traceback" not in out
