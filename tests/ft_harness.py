"""Fault-tolerant runs for the tests: a real Lighthouse and real replica jobs (processes, gloo).

Every replica job is started the way a user starts one: `python -m streaming_muloco.train
--replica-id k --lighthouse HOST:PORT` with its own rendezvous (RANK/WORLD_SIZE/MASTER_PORT, or
`launch/mpirun_local.sh` for D > 1). Output goes to a file, so a test can wait for a step.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from multirank import REPO, base_env, free_port

CONFIG = "ds_configs/streaming_muloco_cpu.json"


class Lighthouse:
    def __init__(self, min_replicas: int, heartbeat_ms: int = 1500, join_ms: int = 1000) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streaming_muloco.lighthouse", "--port", "0", "--min-replicas", str(min_replicas),
             "--heartbeat-timeout-ms", str(heartbeat_ms), "--join-timeout-ms", str(join_ms)],
            cwd=REPO, env=base_env({"RUST_LOG": "warn"}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on \S+:(\d+)", line)
        assert m, f"lighthouse did not start: {line!r}"
        self.address = f"127.0.0.1:{m.group(1)}"

    def stop(self) -> None:
        _kill(self.proc)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)


class Replica:
    """One replica job: D processes, or one `launch/mpirun_local.sh` / `launch/deepspeed_launch.sh` /
    torchrun job (launcher "mpirun" / "deepspeed" / "torchrun"); output in out/replica{k}.log."""

    def __init__(self, k: int, D: int, out: Path, lighthouse: str, args: list[str], launcher: str = "env") -> None:
        self.k, self.out = k, out
        self.log = out / f"replica{k}.log"
        out.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "w")
        flags = ["--replica-id", str(k), "--lighthouse", lighthouse, "--out-dir", str(out), *args]
        train = ["--ds-config", CONFIG, *flags]
        port = free_port()
        if launcher == "deepspeed":
            hostfile = out / f"hostfile{k}"
            hostfile.write_text(f"localhost slots={D}\n")
            self.procs = [subprocess.Popen(["bash", "launch/deepspeed_launch.sh", str(hostfile), CONFIG, *flags],
                                           cwd=REPO, env=base_env({"MASTER_PORT": str(port)}), stdout=fh,
                                           stderr=subprocess.STDOUT, start_new_session=True)]
        elif launcher == "torchrun":
            self.procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                                            "--nproc-per-node", str(D), "--master-addr", "127.0.0.1",
                                            "--master-port", str(port), "-m", "streaming_muloco.train", *train],
                                           cwd=REPO, env=base_env({}), stdout=fh, stderr=subprocess.STDOUT,
                                           start_new_session=True)]
        elif launcher == "mpirun":
            self.procs = [subprocess.Popen(["bash", "launch/mpirun_local.sh", str(D), CONFIG, *flags], cwd=REPO,
                                           env=base_env({"MASTER_PORT": str(port)}), stdout=fh,
                                           stderr=subprocess.STDOUT, start_new_session=True)]
        else:
            self.procs = []
            for d in range(D):
                env = base_env({"RANK": str(d), "LOCAL_RANK": str(d), "WORLD_SIZE": str(D),
                                "LOCAL_WORLD_SIZE": str(D), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                self.procs.append(subprocess.Popen([sys.executable, "-m", "streaming_muloco.train", *train], cwd=REPO,
                                                   env=env, stdout=fh, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def current_step(self) -> int:
        """The last step in its progress lines (0 before the first): a replica prints steps only once
        it is in a quorum."""
        return max((int(m) for m in re.findall(r"step\s+(\d+)/", self.output())), default=0)

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        self._wait_until(lambda: self.current_step() >= step, f"step {step}", timeout)

    def wait_for_startup(self, timeout: float = 240) -> None:
        """Until its start-up line (printed right before it asks for its first quorum)."""
        self._wait_until(lambda: "params |" in self.output(), "its start-up line", timeout)

    def _wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if done():
                return
            if all(p.poll() is not None for p in self.procs):
                raise AssertionError(f"replica {self.k} ended before {what}:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"replica {self.k} did not reach {what} in {timeout} s:\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"replica {self.k} did not finish in {timeout} s:\n{self.output()[-3000:]}")
        return [p.returncode for p in self.procs]

    def kill(self, sig: int = signal.SIGKILL, rank: int | None = None) -> None:
        for d, p in enumerate(self.procs):
            if rank is None or d == rank:
                _kill(p, sig)

    def result(self) -> dict:
        return json.loads((self.out / f"replica{self.k}" / "result.json").read_text())


def start_first_then_others(make: Callable[[int], Replica], n: int) -> list[Replica]:
    """Replica job 0 (give it the slowest launcher), then, once it printed its start-up line, jobs
    1..n-1 together: a slow launcher cannot start after the others finished a short run. If one
    fails to start, the ones already running are killed."""
    reps: list[Replica] = []
    try:
        reps.append(make(0))
        reps[0].wait_for_startup()
        reps += [make(k) for k in range(1, n)]
    except BaseException:
        for r in reps:
            r.kill()
        raise
    return reps


def train_args(num_replicas: int, steps: int, min_replicas: int, extra: list[str] = ()) -> list[str]:
    return ["--steps", str(steps), "--log-every", "5", "--eval-every", str(steps), "--eval-batches", "2", "--no-save",
            "--set", f"streaming_muloco.num_replicas={num_replicas}", "--set", "streaming_muloco.sync_every=10",
            "--set", "streaming_muloco.fault_tolerance.timeout_s=10",
            "--set", f"streaming_muloco.fault_tolerance.min_replicas={min_replicas}", *extra]
