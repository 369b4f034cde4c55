"""exit_process: the exit status, which hooks run, and a real two-rank gloo job that leaves through it.

The race it closes is rare (a few percent of jobs); the loop that shows the rate before and
after is benchmarks/abort_loop.py, not a unit test. What is pinned here is the contract:
`finished=True` runs atexit hooks and still skips the teardown; `finished=False` skips both.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from multirank import base_env, run_ranks

REPO = Path(__file__).resolve().parents[1]

HOOK = ("import atexit, sys\n"
        "from streaming_muloco import exit_process\n"
        "atexit.register(lambda: open(sys.argv[1], 'w').write('hook ran'))\n")


@pytest.mark.parametrize("finished,hook_runs", [(True, True), (False, False)])
def test_exit_code_and_atexit_hooks(tmp_path: Path, finished: bool, hook_runs: bool) -> None:
    marker = tmp_path / "marker"
    code = HOOK + f"print('before', flush=False)\nexit_process(7, finished={finished})\nprint('after')\n"
    p = subprocess.run([sys.executable, "-c", code, str(marker)], cwd=REPO, env=base_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 7, p.stderr
    assert p.stdout == "before\n"  # buffered output is flushed, nothing after the call runs
    assert marker.exists() == hook_runs


def test_two_gloo_ranks_leave_cleanly() -> None:
    code = ("import datetime, torch, torch.distributed as dist\n"
            "from streaming_muloco import exit_process\n"
            "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))\n"
            "t = torch.ones(4)\n"
            "dist.all_reduce(t)\n"
            "print('sum', int(t[0]), flush=True)\n"
            "exit_process(0)\n")
    res = run_ranks(2, ["-c", code], timeout=120)
    assert res.ok, res.describe()
    assert all("sum 2" in out for out in res.outputs), res.describe()
