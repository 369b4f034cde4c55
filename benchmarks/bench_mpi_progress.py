"""Does Open MPI move a non-blocking collective's bytes while Python computes? (issue: overlap)

Open MPI's TCP transport reports "progress: no": bytes move only inside MPI calls. This measures
what that costs and what fixes it, with the library's own `MPIBackend` and `Handle.poke()` (the
code path the engine uses), on 2 and 4 ranks (K = ranks) under `mpirun`, TCP forced (`--mca btl tcp,self`, so no
shared-memory shortcut):

- comm alone: `all_gather` of N fp32 started and waited on at once;
- no poke: started, then C seconds of matmuls with no MPI call, then `wait()`;
- poke: the same compute with `poke()` (one `MPI_Test`) after every ~5 ms chunk, as the engine
  does once per micro-step;
- each of the above again under `--mca btl_tcp_progress_thread 1`.

C is 1.5x the comm-alone time, so the collective could hide fully. Exposed = time blocked in
`wait()` after the compute; efficiency = 1 - exposed / comm alone. Medians of --repeats.

    python benchmarks/bench_mpi_progress.py --json benchmarks/results/mpi_progress.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from multirank import run_mpirun  # noqa: E402  (the test harness's mpirun: env, root, OMPI settings)


def worker(numel: int, repeats: int) -> None:
    """One rank; every rank is its own replica (K = world size, D = 1)."""
    import torch

    from streaming_muloco.comm.mpi_backend import MPIBackend

    torch.set_num_threads(1)  # one core per rank: the 2 ranks fill this 2-core machine
    from mpi4py import MPI
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    topo = SimpleNamespace(world_size=size, rank=rank, num_replicas=size, replica_id=rank, ranks_per_replica=1,
                           shard_id=0)
    comm = MPIBackend(topo, timeout_s=600)
    x = torch.randn(numel)
    a = torch.randn(192, 192)

    def compute(seconds: float, poke=None) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.005:
                a.mul_(0.5).add_(a @ a, alpha=1e-3)
            if poke is not None:
                poke()

    def timed_comm() -> float:
        MPI.COMM_WORLD.Barrier()
        t = time.perf_counter()
        comm.all_gather(x).wait()
        return time.perf_counter() - t

    timed_comm()  # warm-up: connection set-up
    t_comm = statistics.median(timed_comm() for _ in range(repeats))
    c = 1.5 * t_comm
    row = {"comm_alone_s": t_comm, "compute_s": c}
    for mode in ("no_poke", "poke"):
        exposed = []
        for _ in range(repeats):
            MPI.COMM_WORLD.Barrier()
            h = comm.all_gather(x)
            compute(c, h.poke if mode == "poke" else None)
            t = time.perf_counter()
            h.wait()
            exposed.append(time.perf_counter() - t)
        row[f"{mode}_exposed_s"] = statistics.median(exposed)
        row[f"{mode}_efficiency"] = 1 - row[f"{mode}_exposed_s"] / t_comm
    if rank == 0:
        print("RESULT " + json.dumps(row), flush=True)


def run(numel: int, repeats: int, progress_thread: bool, ranks: int) -> dict:
    res = run_mpirun(ranks, [__file__, "--worker", "--numel", str(numel), "--repeats", str(repeats)], timeout=900,
                     mpi_args=["--mca", "btl", "tcp,self",
                               "--mca", "btl_tcp_progress_thread", "1" if progress_thread else "0"])
    lines = [ln for ln in res.outputs[0].splitlines() if ln.startswith("RESULT ")]
    if not res.ok or not lines:
        raise SystemExit(f"mpirun failed:\n{res.describe()}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=32 * 2**20, help="fp32 elements each rank contributes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to run (K = ranks)")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.numel, args.repeats)
        return 0
    rows = []
    for ranks in args.ranks:
        for pt in (False, True):
            r = run(args.numel, args.repeats, pt, ranks)
            r.update(progress_thread=pt, ranks=ranks)
            rows.append(r)
    print(f"all_gather of {args.numel * 4 / 2**20:.0f} MiB per rank, TCP over loopback, medians of {args.repeats}")
    print("| ranks | btl_tcp_progress_thread | comm alone (s) | exposed, no poke (s) | exposed, poke (s) | "
          "efficiency no poke | efficiency poke |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {int(r['progress_thread'])} | {r['comm_alone_s']:.3f} | {r['no_poke_exposed_s']:.3f} | "
              f"{r['poke_exposed_s']:.3f} | {r['no_poke_efficiency']:.2f} | {r['poke_efficiency']:.2f} |")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        meta = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": "2 vCPU, CPU only",
                "command": " ".join(["python"] + sys.argv), "numel": args.numel, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
