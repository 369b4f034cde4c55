"""Fault tolerance measured on real replica jobs: goodput under failure, time to recover, time to heal.

Every run is a torchft Lighthouse plus K=3 replica jobs of D=1 (`python -m streaming_muloco.train
--replica-id k --lighthouse ...`, started by tests/ft_harness.py exactly as a user would), gloo on
loopback, tiny model by default. Four measurements:

1. Goodput under failure: run A (no failure) and run B (SIGKILL of replica 2 once it has logged
   step steps/2), same seed and config, alternated `--repeats` times. For the survivors
   (replicas 0 and 1): tokens/s (result.json, and from the TensorBoard wall times of their
   train/loss events in a window before the kill and one after it), final eval loss, train loss
   at steps/6, 2*steps/6, ...; tokens processed by all replicas in each run.
2. Time to recover: seconds from the kill to the first outer sync a survivor completes after it
   (mtime of the first --trace-syncs file written after the kill), and to the first completed
   sync whose quorum no longer held the dead replica; seconds_lost of result.json's failures.
3. Time to heal: 2 replicas run, replica 2 starts from nothing once replica 0 has logged step
   `--join-at`; its heals[0].seconds (time inside the quorum call that healed it), and wall time
   from its process start to its first logged step; for the tiny model and for a model of
   >= 25M parameters (16 layers x 384, 28.4M params, block 64, micro batch 4, H=4, 40 steps).
4. The joiner's fresh inner optimizer state (Muon/Adam moments at zero): its train loss in its
   first logged windows after joining against the survivors' at the same steps, and final eval
   losses; run A's replica 2 against replicas 0/1 is the control (different data streams only).

    nice -n 5 python benchmarks/bench_fault_tolerance.py --json benchmarks/results/fault_tolerance.json
    nice -n 5 python benchmarks/bench_fault_tolerance.py --quick --json /tmp/ft_quick.json   # smoke, ~2 min

Options: --repeats (A/B pairs, default 3), --steps (tiny runs, default 300), --skip-big, --keep DIR
(keep the run directories: logs, result.json, traces). Every process is started in its own
session and killed (killpg) on the way out, also on failure or Ctrl-C; every wait has a timeout.
Tokens/s is noisy when other work shares the cores; compare A and B of the same pair.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from ft_harness import CONFIG, Lighthouse, Replica  # noqa: E402

K = 3
# The lighthouse's default. A failure is detected by the heartbeat timeout (1.5 s here), not by
# this; this is how long a quorum waits for a live replica that is late. A shorter one (the
# tests' 1 s) leaves out replicas that are merely slow on these 2 shared cores, which then heal
# forward and skip steps; for the 28.5M model a heal takes longer than 1 s, so the healed
# replica is late again at the next sync (measured: healed at every sync of that run).
JOIN_TIMEOUT_MS = 10_000
BIG = ["--n-layer", "16", "--n-embd", "384", "--n-head", "6", "--block-size", "64",
       "--set", "train_micro_batch_size_per_gpu=4"]
STEP_RE = re.compile(r"^step\s+(\d+)/\d+ \| loss")
JOINED_RE = re.compile(r"joined at inner step (\d+)")

_live: list = []  # every Lighthouse / Replica started, for the cleanup


def cleanup() -> None:
    for obj in reversed(_live):
        try:
            obj.stop() if isinstance(obj, Lighthouse) else obj.kill()
        except Exception as e:  # noqa: BLE001 - keep killing the others
            print(f"cleanup: {e}", file=sys.stderr)
    _live.clear()


class Tail(threading.Thread):
    """Timestamps every line the watched logs gain (polled every 20 ms): (time.time(), line)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.files: dict[Path, list] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def watch(self, path: Path) -> list[tuple[float, str]]:
        lines: list[tuple[float, str]] = []
        with self.lock:
            self.files[path] = [0, b"", lines]
        return lines

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            with self.lock:
                for path, state in self.files.items():
                    try:
                        with open(path, "rb") as fh:
                            fh.seek(state[0])
                            data = fh.read()
                    except FileNotFoundError:
                        continue
                    state[0] += len(data)
                    *full, state[1] = (state[1] + data).split(b"\n")
                    state[2].extend((now, ln.decode(errors="replace")) for ln in full)
            time.sleep(0.02)


TAIL = Tail()


class Job:
    """A Replica with its start time and timestamped log lines."""

    def __init__(self, k: int, out: Path, lighthouse: str, args: list[str]) -> None:
        self.k, self.out = k, out
        self.t_start = time.time()
        self.rep = Replica(k, 1, out, lighthouse, args)
        _live.append(self.rep)
        self.lines = TAIL.watch(self.rep.log)

    def steps(self) -> dict[int, float]:
        """Logged step -> time the line appeared."""
        return {int(m.group(1)): t for t, ln in list(self.lines) if (m := STEP_RE.match(ln))}

    def first(self, pattern: str) -> tuple[float, str] | None:
        return next(((t, ln) for t, ln in list(self.lines) if re.search(pattern, ln)), None)

    def wait_for_step(self, step: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.steps()
            if s and max(s) >= step:
                return
            if self.rep.procs[0].poll() is not None:
                raise RuntimeError(f"replica {self.k} ended before step {step}:\n{self.rep.output()[-3000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"replica {self.k} did not reach step {step} in {timeout} s:\n{self.rep.output()[-3000:]}")

    def finish(self, timeout: float) -> dict:
        rcs = self.rep.wait(timeout)
        if rcs != [0]:
            raise RuntimeError(f"replica {self.k} exited {rcs}:\n{self.rep.output()[-3000:]}")
        return self.rep.result()


def train_args(steps: int, sync_every: int, trace: Path, log_every: int, model: list[str]) -> list[str]:
    return ["--steps", str(steps), "--log-every", str(log_every), "--eval-every", str(steps), "--eval-batches", "4",
            "--no-save", "--set", f"streaming_muloco.num_replicas={K}", "--set", f"streaming_muloco.sync_every={sync_every}",
            "--set", "streaming_muloco.fault_tolerance.timeout_s=10",
            "--set", "streaming_muloco.fault_tolerance.min_replicas=2",
            "--set", "streaming_muloco.fault_tolerance.quorum_timeout_s=120", "--trace-syncs", str(trace), *model]


def traces(d: Path) -> list[tuple[int, int, float]]:
    """(step, fragment, mtime) of each committed outer step rank 0 saved, in mtime order."""
    out = []
    for f in d.glob("step*_frag*.pt"):
        m = re.match(r"step(\d+)_frag(\d+)\.pt", f.name)
        out.append((int(m.group(1)), int(m.group(2)), f.stat().st_mtime))
    return sorted(out, key=lambda x: x[2])


def tb_times(run_dir: Path) -> dict[int, float]:
    """step -> wall time of the train/loss event (TensorBoard's own clock, exact)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times = {}
    for f in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            if any(v.tag == "train/loss" for v in ev.summary.value):
                times[ev.step] = ev.wall_time
    return times


def rate(times: dict[int, float], a: int, b: int, tokens_per_step: int) -> float | None:
    return tokens_per_step * (b - a) / (times[b] - times[a]) if a in times and b in times else None


def tokens_per_step(res: dict) -> int:
    return res["tokens"] // res["steps"]


def sync_delay() -> int:
    return json.loads((REPO / CONFIG).read_text())["streaming_muloco"].get("sync_delay", 0)


# ---- 1 + 2: goodput and recovery --------------------------------------------------------------
def failure_run(work: Path, name: str, steps: int, kill_at: int | None, windows: tuple) -> dict:
    out = work / name
    lh = Lighthouse(min_replicas=2, join_ms=JOIN_TIMEOUT_MS)
    _live.append(lh)
    args = lambda k: train_args(steps, 10, out / f"trace{k}", 5, [])  # noqa: E731
    jobs = [Job(k, out, lh.address, args(k)) for k in range(K)]
    t0 = time.time()
    kill = None
    try:
        if kill_at is not None:
            jobs[2].wait_for_step(kill_at, timeout=300)
            t_kill = time.time()
            jobs[2].rep.kill(signal.SIGKILL)
            logged = jobs[2].steps()
            joined = jobs[2].first(JOINED_RE.pattern)
            start = int(JOINED_RE.search(joined[1]).group(1)) if joined else 0
            last_logged = max(logged)
            last_sync = max((s for s, _, _ in traces(out / "trace2")), default=None)
            kill = {"t_kill": t_kill, "last_logged_step": last_logged, "start_step": start,
                    "steps_run_at_least": last_logged - start, "last_committed_sync_step": last_sync}
        results = {k: jobs[k].finish(timeout=600) for k in range(K) if kill_at is None or k != 2}
    finally:
        for j in jobs:
            j.rep.kill()
        lh.stop()
    wall = time.time() - t0
    tps = tokens_per_step(results[0])
    run = {"name": name, "wall_s": wall, "kill": kill, "replicas": {}}
    tok_total = 0
    for k, res in results.items():
        t = tb_times(out / f"replica{k}")
        n = res["steps_run"]  # a joiner starts at its peers' step
        tok_total += n * tps
        run["replicas"][k] = {
            "tokens_per_s": res["tokens_per_s"], "steady_tokens_per_s": res["steady_tokens_per_s"],
            "seconds": res["seconds"], "steps_run": n, "final_eval_loss": res["final_eval_loss"],
            "train_loss": res["history"]["train_loss"], "quorum_history": res["quorum_history"],
            "drops": res["drops"], "joins": res["joins"], "heals": res["heals"], "failures": res["failures"],
            "theta_g_sha256": res["theta_g_sha256"],
            "window_tokens_per_s": {f"{a}-{b}": rate(t, a, b, tps) for a, b in windows}}
    if kill:
        tok_total += kill["steps_run_at_least"] * tps
        for k, r in run["replicas"].items():
            tr = traces(out / f"trace{k}")
            after = [x for x in tr if x[2] > kill["t_kill"]]
            q = r["quorum_history"]
            last3 = max(i for i, (_, n) in enumerate(q) if n == K)
            first2 = q[last3 + 1][0] if last3 + 1 < len(q) else None  # first sync started without replica 2
            no_dead = next((x for x in after if first2 is not None and x[0] > first2), None)
            r["recovery"] = {
                "first_sync_after_kill": after[0][:2] if after else None,
                "s_to_first_sync_after_kill": after[0][2] - kill["t_kill"] if after else None,
                "first_quorum_without_dead_step": first2,
                "first_sync_without_dead": no_dead[:2] if no_dead else None,
                "s_to_first_sync_without_dead": no_dead[2] - kill["t_kill"] if no_dead else None,
                "seconds_lost": [f["seconds_lost"] for f in r["failures"]]}
    run["tokens_total"] = tok_total
    run["tokens_per_step"] = tps
    run["same_theta_g"] = len({r["theta_g_sha256"] for r in run["replicas"].values()}) == 1
    return run


# ---- 3 + 4: heal --------------------------------------------------------------------------------
def join_run(work: Path, name: str, steps: int, sync_every: int, join_at: int, log_every: int,
             model: list[str], timeout: float) -> dict:
    out = work / name
    lh = Lighthouse(min_replicas=2, join_ms=JOIN_TIMEOUT_MS)
    _live.append(lh)
    args = lambda k: train_args(steps, sync_every, out / f"trace{k}", log_every, model)  # noqa: E731
    jobs = [Job(k, out, lh.address, args(k)) for k in range(2)]
    t0 = time.time()
    try:
        jobs[0].wait_for_step(join_at, timeout=timeout)
        at = max(jobs[0].steps())
        jobs.append(Job(2, out, lh.address, args(2)))
        results = {j.k: j.finish(timeout=timeout) for j in jobs}
    finally:
        for j in jobs:
            j.rep.kill()
        lh.stop()
    joiner, res = jobs[2], results[2]
    params = res["num_params"]
    started = joiner.first(r"params \|")
    joined = joiner.first(JOINED_RE.pattern)
    first_step = min(joiner.steps().items()) if joiner.steps() else None
    heal = res["heals"][0] if res["heals"] else None
    peers = jobs[0].steps()
    steps_sorted = sorted(peers)
    peer_step_s = ((peers[steps_sorted[-1]] - peers[steps_sorted[0]]) / (steps_sorted[-1] - steps_sorted[0])
                   if len(steps_sorted) > 1 else None)
    mine = dict((s, v) for s, v in res["history"]["train_loss"])
    theirs = [dict((s, v) for s, v in results[k]["history"]["train_loss"]) for k in (0, 1)]
    common = [s for s in sorted(mine) if all(s in t for t in theirs)]
    loss_rows = [{"step": s, "joiner": mine[s], "survivor_mean": (theirs[0][s] + theirs[1][s]) / 2,
                  "diff": mine[s] - (theirs[0][s] + theirs[1][s]) / 2} for s in common]
    return {
        "name": name, "wall_s": time.time() - t0, "params": params,
        "bytes_theta_g_and_momentum": 2 * 4 * params, "peers_step_when_started": at,
        "heal": heal, "peer_seconds_per_step": peer_step_s,
        "fragment_interval_steps": sync_every // 2,
        "s_process_start_to_startup_line": started[0] - joiner.t_start if started else None,
        "s_process_start_to_joined_line": joined[0] - joiner.t_start if joined else None,
        "s_process_start_to_first_step": first_step[1] - joiner.t_start if first_step else None,
        "first_logged_step": first_step[0] if first_step else None,
        "loss_after_join": loss_rows,
        "final_eval_loss": {k: results[k]["final_eval_loss"] for k in results},
        "same_theta_g": len({r["theta_g_sha256"] for r in results.values()}) == 1,
        "quorum_history_0": results[0]["quorum_history"], "joins_0": results[0]["joins"]}


# ---- report ---------------------------------------------------------------------------------------
def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report(meta: dict, pairs: list[dict], joins: list[dict], steps: int, windows: tuple) -> None:
    print(f"\n## runs: {len(pairs)} pairs of A (no failure) / B (SIGKILL of replica 2 at step {steps // 2}), "
          f"K=3 x D=1, tiny, {steps} steps")
    print("\n| pair | run | replica | tok/s (result.json) | " + " | ".join(f"tok/s steps {a}-{b}" for a, b in windows)
          + " | final eval loss | steps run |")
    print("|---|---|---|---:|" + "---:|" * len(windows) + "---:|---:|")
    for i, p in enumerate(pairs, 1):
        for run in (p["A"], p["B"]):
            for k, r in run["replicas"].items():
                print(f"| {i} | {run['name'][0]} | {k} | {r['tokens_per_s']:,.0f} | "
                      + " | ".join(fmt(r["window_tokens_per_s"][f"{a}-{b}"], ",.0f") for a, b in windows)
                      + f" | {r['final_eval_loss']:.4f} | {r['steps_run']} |")
    print("\n| pair | A: tokens by all replicas | B: tokens by all replicas | B / A | "
          "B: replica 2 steps run (>=) | B: replica 2 last committed sync | A wall s | B wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, p in enumerate(pairs, 1):
        a, b = p["A"], p["B"]
        print(f"| {i} | {a['tokens_total']:,} | {b['tokens_total']:,} | {b['tokens_total'] / a['tokens_total']:.3f} | "
              f"{b['kill']['steps_run_at_least']} | step {b['kill']['last_committed_sync_step']} | "
              f"{a['wall_s']:.1f} | {b['wall_s']:.1f} |")
    print("\nAggregate tokens/s over live replicas per window (sum of per-replica rates):")
    print("| pair | run | " + " | ".join(f"steps {a}-{b}" for a, b in windows) + " |")
    print("|---|---|" + "---:|" * len(windows))
    for i, p in enumerate(pairs, 1):
        for run in (p["A"], p["B"]):
            cells = []
            for a, b in windows:
                vals = [r["window_tokens_per_s"][f"{a}-{b}"] for r in run["replicas"].values()]
                cells.append(fmt(sum(vals), ",.0f") if None not in vals else "-")
            print(f"| {i} | {run['name'][0]} ({len(run['replicas'])} live at end) | " + " | ".join(cells) + " |")
    marks = list(range(steps // 6, steps + 1, steps // 6))
    print("\nTrain loss (5-step window ending at the step), mean of replicas 0 and 1, pair 1 | A | B | B - A:")
    print("| step | A | B | B - A |\n|---:|---:|---:|---:|")
    a_l = [dict(map(tuple, pairs[0]["A"]["replicas"][k]["train_loss"])) for k in (0, 1)]
    b_l = [dict(map(tuple, pairs[0]["B"]["replicas"][k]["train_loss"])) for k in (0, 1)]
    for s in marks:
        if all(s in d for d in a_l + b_l):
            av, bv = (a_l[0][s] + a_l[1][s]) / 2, (b_l[0][s] + b_l[1][s]) / 2
            print(f"| {s} | {av:.4f} | {bv:.4f} | {bv - av:+.4f} |")
    print("\nRecovery after the kill (per survivor):")
    print("| pair | replica | kill at logged step | s to first sync completed after kill (its step/frag) | "
          "first quorum without replica 2 (step) | s to first sync completed without replica 2 | seconds_lost |")
    print("|---|---|---:|---|---:|---|---|")
    firsts, nodead, lost = [], [], []
    for i, p in enumerate(pairs, 1):
        b = p["B"]
        for k, r in b["replicas"].items():
            rc = r["recovery"]
            firsts.append(rc["s_to_first_sync_after_kill"])
            nodead.append(rc["s_to_first_sync_without_dead"])
            lost += rc["seconds_lost"]
            print(f"| {i} | {k} | {b['kill']['last_logged_step']} | {fmt(rc['s_to_first_sync_after_kill'], '.2f')} "
                  f"({rc['first_sync_after_kill']}) | {rc['first_quorum_without_dead_step']} | "
                  f"{fmt(rc['s_to_first_sync_without_dead'], '.2f')} ({rc['first_sync_without_dead']}) | "
                  f"{', '.join(f'{x:.2f}' for x in rc['seconds_lost'])} |")
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None  # noqa: E731
    print(f"median: first sync after kill {fmt(med(firsts), '.2f')} s, first sync without replica 2 "
          f"{fmt(med(nodead), '.2f')} s, seconds_lost {fmt(med(lost), '.2f')} s")
    print("\nHeal of a replica started from nothing:")
    print("| run | params | theta_g + outer momentum | peers at step when started | healed at step | "
          "heals[0].seconds | peer s/step | s start->startup line | s start->joined | s start->first logged step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for j in joins:
        h = j["heal"] or {}
        print(f"| {j['name']} | {j['params']:,} | {j['bytes_theta_g_and_momentum'] / 1e6:.1f} MB | "
              f"{j['peers_step_when_started']} | {h.get('step', '-')} | {fmt(h.get('seconds'), '.2f')} | "
              f"{fmt(j['peer_seconds_per_step'], '.2f')} | {fmt(j['s_process_start_to_startup_line'], '.1f')} | "
              f"{fmt(j['s_process_start_to_joined_line'], '.1f')} | {fmt(j['s_process_start_to_first_step'], '.1f')} |")
    for j in joins:
        print(f"\nJoiner vs survivors, {j['name']} (train loss, first logged windows after joining); "
              f"final eval loss " + ", ".join(f"r{k} {v:.4f}" for k, v in j["final_eval_loss"].items())
              + f"; theta_g equal at the end: {j['same_theta_g']}")
        print("| step | joiner | survivors (mean) | joiner - survivors |\n|---:|---:|---:|---:|")
        for row in j["loss_after_join"][:6]:
            print(f"| {row['step']} | {row['joiner']:.4f} | {row['survivor_mean']:.4f} | {row['diff']:+.4f} |")
    # control: in a run without failure, replica 2 vs replicas 0/1 differ only by their data stream
    for i, p in enumerate(pairs, 1):
        reps = p["A"]["replicas"]
        d = [dict(map(tuple, reps[k]["train_loss"])) for k in range(K)]
        diffs = [d[2][s] - (d[0][s] + d[1][s]) / 2 for s in d[2] if s in d[0] and s in d[1] and s > steps // 3]
        if diffs:
            p["control_r2_minus_r01"] = {"mean": statistics.mean(diffs), "mean_abs": statistics.mean(map(abs, diffs)),
                                         "n": len(diffs)}
            print(f"control, pair {i} run A (no failure): replica 2 - mean(0,1) train loss over steps > {steps // 3}: "
                  f"mean {statistics.mean(diffs):+.4f}, mean |.| {statistics.mean(map(abs, diffs)):.4f} "
                  f"({len(diffs)} windows)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # runs the finally: every job is killed


def machine() -> str:
    import deepspeed
    import torch
    import torchft  # noqa: F401
    from importlib.metadata import version

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} vCPU {platform.machine()}, {mem:.0f} GiB, torch {torch.__version__}, "
            f"DeepSpeed {deepspeed.__version__}, torchft {version('torchft')}, gloo")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer steps and one pair, for a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs (each B is one kill)")
    ap.add_argument("--steps", type=int, default=300, help="inner steps of the tiny runs (a multiple of 30)")
    ap.add_argument("--join-at", type=int, default=40, help="tiny join run: start replica 2 at this step of replica 0")
    ap.add_argument("--skip-big", action="store_true", help="no >= 25M-parameter join run")
    ap.add_argument("--keep", help="keep the run directories here")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.join_at = 1, 120, 20
    steps = args.steps
    if steps % 30:
        ap.error("--steps must be a multiple of 30")
    windows = ((steps // 6, steps // 2), (2 * steps // 3, steps))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "streaming_muloco"], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout.split()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "library_files_modified_vs_commit": dirty[1::2], "machine": machine(),
            "command": " ".join(["python"] + sys.argv), "steps": steps, "K": K, "D": 1,
            "sync_every": 10, "sync_delay": sync_delay(), "windows": windows,
            "lighthouse": {"min_replicas": 2, "heartbeat_timeout_ms": 1500, "join_timeout_ms": JOIN_TIMEOUT_MS},
            "fault_tolerance": {"timeout_s": 10, "min_replicas": 2, "quorum_timeout_s": 120}}
    print(json.dumps(meta), flush=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_ft_"))
    work.mkdir(parents=True, exist_ok=True)
    TAIL.start()
    t0 = time.time()
    pairs, joins, errors = [], [], []
    try:
        for i in range(args.repeats):
            a = failure_run(work, f"A{i}", steps, None, windows)
            print(f"pair {i + 1} A: {a['wall_s']:.1f} s", flush=True)
            b = failure_run(work, f"B{i}", steps, steps // 2, windows)
            print(f"pair {i + 1} B: {b['wall_s']:.1f} s, killed after logged step {b['kill']['last_logged_step']}",
                  flush=True)
            pairs.append({"A": a, "B": b})
        plan = [(f"join tiny {i + 1}", steps, 10, args.join_at, 5, [], 300) for i in range(1 if args.quick else 2)]
        if not args.skip_big:  # the joiner's start-up alone takes ~50 s on 2 busy cores: leave the peers steps
            plan.append(("join >=25M", 30 if args.quick else 40, 4, 4 if args.quick else 6, 1, BIG, 600))
        for name, *rest in plan:
            try:
                j = join_run(work, name, *rest)
                print(f"{name}: {j['wall_s']:.1f} s", flush=True)
                joins.append(j)
            except RuntimeError as e:  # recorded and reported, the other runs still count
                print(f"{name} FAILED: {e}", flush=True)
                errors.append({"run": name, "error": str(e)})
    finally:
        cleanup()
        TAIL.stop.set()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["wall_s"] = time.time() - t0
    report(meta, pairs, joins, steps, windows)
    for e in errors:
        print(f"\nFAILED {e['run']}: {e['error']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**meta, "pairs": pairs, "joins": joins, "errors": errors}, indent=1))
    print(f"\ntotal wall {meta['wall_s']:.0f} s", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
