"""Count the jobs in which a rank aborts: the loop behind "terminate called without an active exception".

A rank used to die now and then with that line, SIGABRT (rc -6) and no Python traceback. It
looked like a start-up crash, since a rank other than 0 prints nothing but DeepSpeed's shm-op
line, but it is an exit race (`streaming_muloco.exit_process` is the fix): the main thread
returns from the last gloo collective and starts the interpreter's teardown while a gloo worker thread has not yet
dropped that collective's work. Dropping its tensors takes the GIL; during teardown CPython
ends the thread with pthread_exit, whose unwinding reaches a noexcept destructor, so
std::terminate (pytorch/pytorch#190489). A rate of a few percent needs a loop of jobs to see,
and the same loop before and after a change to show a fix; this is that loop.

    # the real entry point (python -m streaming_muloco.train, --steps 2 --no-save), 2 gloo ranks
    nice -n 10 python benchmarks/abort_loop.py --jobs 100 --ranks 2
    # the same, one rank per network namespace on a tbf-shaped link (root), torch.compile on
    nice -n 10 python benchmarks/abort_loop.py --jobs 40 --netns 100mbit --dynamo
    # torch alone: one gloo all_reduce, then a normal exit / a barrier first / os._exit
    nice -n 10 python benchmarks/abort_loop.py --jobs 100 --bare exit --pin
    nice -n 10 python benchmarks/abort_loop.py --jobs 100 --bare barrier --pin
    nice -n 10 python benchmarks/abort_loop.py --jobs 100 --bare os_exit --pin

The "before" of a change: the same command from a worktree of the parent commit, with this
file copied in. It prints one line per failed job and a final `runs N failures F (abort A,
other O, hang H)`; `--keep DIR` saves each failed job's rank outputs, `--core` lets ranks
write core files (see /proc/sys/kernel/core_pattern). Exit status 1 when any job failed.
"""
from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from multirank import base_env, run_ranks  # noqa: E402

# Rank r alone on CPU r % ncpu: its main thread and gloo workers then share one core, which
# widens the race in the bare job (9/30 aborts pinned vs 5/30 not, measured here).
PIN = "import os; os.sched_setaffinity(0, {int(os.environ['RANK']) % os.cpu_count()})\n"
TRAIN = "import runpy; runpy.run_module('streaming_muloco.train', run_name='__main__', alter_sys=True)\n"
BARE = ("import datetime, os, sys, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))\n"
        "dist.all_reduce(torch.ones(16))\n")
BARE_END = {"exit": "", "barrier": "dist.barrier()\n", "os_exit": "sys.stdout.flush(); os._exit(0)\n"}


def job_argv(args: argparse.Namespace, out: str) -> list[str]:
    code = PIN if args.pin else ""
    if args.bare:
        return ["-c", code + BARE + BARE_END[args.bare]]
    train = ["--ds-config", args.config, "--steps", str(args.steps), "--eval-every", str(args.steps),
             "--eval-batches", "1", "--log-every", str(args.steps), "--no-save", "--out-dir", out,
             "--set", f"streaming_muloco.num_replicas={args.ranks}", "--set", "streaming_muloco.sync_every=1"]
    for s in args.set:
        train += ["--set", s]
    return (["-c", code + TRAIN] if args.pin else ["-m", "streaming_muloco.train"]) + train


def classify(rcs: list[int]) -> str:
    """'ok', 'abort' (a rank got SIGABRT: the failure hunted here) or 'other'."""
    if all(rc == 0 for rc in rcs):
        return "ok"
    return "abort" if -6 in rcs or 134 in rcs else "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--config", default="ds_configs/muloco_cpu.json")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra --set for the trainer")
    ap.add_argument("--dynamo", action="store_true", help="leave torch.compile on (TORCHDYNAMO_DISABLE=0)")
    ap.add_argument("--bare", choices=sorted(BARE_END), help="torch alone instead of the trainer; how it ends")
    ap.add_argument("--pin", action="store_true", help="run rank r on CPU r %% ncpu only")
    ap.add_argument("--netns", metavar="RATE", help="one rank per network namespace on a link of RATE (root)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for every rank")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per job")
    ap.add_argument("--keep", help="write each failed job's rank outputs under this directory")
    ap.add_argument("--core", action="store_true", help="let the ranks dump core (RLIMIT_CORE unlimited)")
    args = ap.parse_args()
    env = {"TORCHDYNAMO_DISABLE": "0" if args.dynamo else "1", "PYTHONFAULTHANDLER": "1"}
    env.update(kv.split("=", 1) for kv in args.env)
    if args.core:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    link = None
    if args.netns:
        from netns import Link

        link = Link(args.ranks, args.netns).__enter__()
    counts: collections.Counter[str] = collections.Counter()
    try:
        for job in range(1, args.jobs + 1):
            t0 = time.monotonic()
            with tempfile.TemporaryDirectory() as out:
                try:
                    if link is not None:
                        outs = link.run_ranks(job_argv(args, out), env=base_env(env), timeout=args.timeout, cwd=REPO)
                        rcs, texts = [rc for rc, _ in outs], [text for _, text in outs]
                    else:
                        res = run_ranks(args.ranks, job_argv(args, out), timeout=args.timeout, env=env)
                        rcs, texts = res.returncodes, res.outputs
                    kind = classify(rcs)
                except (AssertionError, TimeoutError) as e:  # how run_ranks / Link report a hang
                    rcs, texts, kind = [], [str(e)], "hang"
            counts[kind] += 1
            if kind != "ok":
                print(f"job {job}/{args.jobs}: {kind} rcs={rcs} ({time.monotonic() - t0:.1f}s)", flush=True)
                if args.keep:
                    d = Path(args.keep, f"job{job:04d}_{kind}")
                    d.mkdir(parents=True, exist_ok=True)
                    for r, text in enumerate(texts):
                        (d / f"rank{r}.txt").write_text(text)
    finally:
        if link is not None:
            link.__exit__(None, None, None)
    failures = args.jobs - counts["ok"]
    print(f"runs {args.jobs} failures {failures} (abort {counts['abort']}, other {counts['other']}, "
          f"hang {counts['hang']})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
