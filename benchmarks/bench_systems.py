"""Utilisation on slow links: DDP vs DiLoCo vs Streaming MuLoCo (2-/4-bit EF), on shaped links.

Two ranks (K=2 x D=1), one per network namespace (benchmarks/netns.py), `small` model, Muon
inner. For every method the same run is also made with the link unshaped in the same session;
compute utilisation = steady-state tokens/s (after the first 5 steps) on the shaped link / the same
unshaped. Needs root.

    python benchmarks/bench_systems.py --rates 1gbit 100mbit 20mbit 5mbit --json benchmarks/results/systems.json --plot benchmarks/results/systems.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overlap import REPO, run_one  # noqa: E402
from netns import Link, measure_mbit  # noqa: E402

from streaming_muloco.comm.base import wire_bytes  # noqa: E402

H = 30
METHODS = {
    "DDP (DeepSpeed DP)": ("ds_configs/dp_muon_cpu.json", []),
    "DiLoCo-style MuLoCo, fp32, tau=0": ("ds_configs/muloco_cpu.json", [f"streaming_muloco.sync_every={H}"]),
    "Streaming MuLoCo P=2 tau=1, 4-bit EF": ("ds_configs/streaming_muloco_cpu.json", [
        f"streaming_muloco.sync_every={H}", 'streaming_muloco.compression={"method":"statistical","bits":4}']),
    "Streaming MuLoCo P=2 tau=1, 2-bit EF": ("ds_configs/streaming_muloco_cpu.json", [
        f"streaming_muloco.sync_every={H}", 'streaming_muloco.compression={"method":"statistical","bits":2}']),
}


def fmt_s(seconds: float | None) -> str:
    return "all (synchronous)" if seconds is None else f"{seconds:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "100mbit", "20mbit", "5mbit"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="small")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    rows = []
    for rate in ["none"] + args.rates:
        with Link(2, rate) as link:
            achieved = measure_mbit()
            print(f"== link {rate}: achieved {achieved:.0f} Mbit/s", flush=True)
            for name, (config, sets) in METHODS.items():
                r = run_one(link, config, sets, args.steps, args.model)
                # DDP's bytes are not counted by our comm layer (DeepSpeed moves them): give the
                # ring all-reduce of every fp32 gradient over the 2 ranks, as issue 5 does.
                ddp_bytes = wire_bytes("all_reduce", 4 * r["num_params"], 2)
                row = {"rate": rate, "achieved_mbit": achieved, "method": name, "tokens_per_s": r["steady_tokens_per_s"],
                       "bytes_per_step": (r["bytes_sent_per_rank"] / args.steps if "bytes_sent_per_rank" in r
                                          else ddp_bytes),
                       "bytes_counted": "bytes_sent_per_rank" in r,
                       # None for DDP: all of its comm sits inside step()
                       "exposed_s": r.get("comm_exposed_s"), "outer_rounds": r.get("outer_steps", 0)}
                rows.append(row)
                print(f"   {name:40s} {row['tokens_per_s']:8.0f} tok/s  exposed {fmt_s(row['exposed_s'])}", flush=True)
    base = {r["method"]: r["tokens_per_s"] for r in rows if r["rate"] == "none"}
    for r in rows:
        r["utilisation"] = r["tokens_per_s"] / base[r["method"]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    meta = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "machine": "2 vCPU, CPU only, gloo",
            "command": " ".join(["python"] + sys.argv), "H": H, "model": args.model, "steps": args.steps}
    print("\n| link | method | tokens/s | bytes/rank/step | utilisation | exposed comm (s) |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        by = f"{r['bytes_per_step']:,.0f}" + ("" if r["bytes_counted"] else " (ring model)")
        print(f"| {r['rate']} ({r['achieved_mbit']:.0f} Mbit/s) | {r['method']} | {r['tokens_per_s']:.0f} | {by} | "
              f"{r['utilisation']:.0%} | {fmt_s(r['exposed_s'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in METHODS:
            pts = sorted((r["achieved_mbit"], r["utilisation"]) for r in rows if r["method"] == name and r["rate"] != "none")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s, measured)")
        ax.set_ylabel("compute utilisation")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=7)
        ax.set_title(f"2 ranks, {args.model} model, H={H} (commit {meta['commit']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
