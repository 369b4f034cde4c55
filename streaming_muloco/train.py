"""Train the bundled LM with DeepSpeed, plain data parallel or with the streaming MuLoCo outer loop.

Examples (run from the repository root; see README.md for the setup):

    # 4 CPU ranks: K=2 replicas x D=2 ZeRO ranks, Muon inner, 2 fragments, overlap 1 step
    mpirun -np 4 --oversubscribe python -m streaming_muloco.train \
        --ds-config ds_configs/streaming_muloco_cpu.json --steps 300

    # plain DeepSpeed data parallel with AdamW on 2 ranks
    mpirun -np 2 python -m streaming_muloco.train --ds-config ds_configs/dp_adamw_cpu.json

    # the deepspeed launcher on one host (CPU needs --num_accelerators)
    deepspeed --num_accelerators 2 --module streaming_muloco.train --ds-config ds_configs/muloco_cpu.json

Any key of the JSON can be overridden: `--set streaming_muloco.sync_every=10 --set optimizer.params.lr=0.01`;
a key the file does not hold needs a leading `+` (`--set +gradient_clipping=0`), so a typo is refused
instead of added (keys of the strict streaming_muloco section need no `+`).

A bad config, argument, data file or checkpoint path stops the job before any process group
starts, with one `error: ...` line (from rank 0 under a launcher) and exit code 2.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn

from .config import SECTION, read_json
from .errors import CheckpointError, ConfigError, UserError, launch_rank, report
from .process_exit import exit_process


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: under a launcher every rank parses
    the same argv, and `main` prints the error once per job, as one `error:` line."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _ArgumentParser(prog="python -m streaming_muloco.train", description=__doc__.split("\n")[0])
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON, optionally with a streaming_muloco section")
    p.add_argument("--set", action="append", default=[], metavar="[+]KEY=JSON",
                   help="override a config key by dotted path, e.g. optimizer.params.muon_lr=0.03; the key must "
                        "be in the file (streaming_muloco.* keys need not be), or prefix it with + to add it: "
                        "+gradient_clipping=0")
    p.add_argument("--model", default="tiny", help="model preset (tiny, small, gpt-125m, llama-1b, llama-7b)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--data", default="shakespeare", help="'shakespeare' (bundled), a .txt file, or a token file")
    p.add_argument("--data-dtype", default="uint16", help="dtype of a token file: uint8, uint16 or uint32")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300, help="inner optimizer steps")
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--out-dir", default="runs/default", help="checkpoints and TensorBoard logs go here")
    p.add_argument("--no-save", action="store_true", help="do not write checkpoints")
    p.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="after each checkpoint, delete older ones beyond the newest N (0: keep all)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint: a step directory, or (no value) the latest one in "
                        "--out-dir/checkpoints; with none there yet, start from step 0")
    p.add_argument("--replica-id", type=int, default=None, metavar="K",
                   help="run this job as replica K of a fault-tolerant run (with --lighthouse); its outputs go to "
                        "--out-dir/replicaK")
    p.add_argument("--lighthouse", default=None, metavar="HOST:PORT",
                   help="the coordinator of a fault-tolerant run (python -m streaming_muloco.lighthouse)")
    p.add_argument("--trace-syncs", default=None, metavar="DIR",
                   help="rank 0 saves theta_g after every outer step to DIR/step{N}_frag{P}.pt (for checking runs "
                        "against each other)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logs")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("steps", "eval_every", "eval_batches", "log_every"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} ({getattr(args, key)}) must be >= 1")
    if args.save_every < 0:
        p.error(f"--save-every ({args.save_every}) must be >= 0")
    if args.keep_last < 0:
        p.error(f"--keep-last ({args.keep_last}) must be >= 0 (0 keeps every checkpoint)")
    if (args.replica_id is None) != (args.lighthouse is None):
        p.error("--replica-id and --lighthouse go together: a fault-tolerant replica job needs both")
    if args.replica_id is not None:
        if args.replica_id < 0:
            p.error(f"--replica-id ({args.replica_id}) must be >= 0")
        args.set = [f"{SECTION}.fault_tolerance.enabled=true", f"{SECTION}.fault_tolerance.replica_id={args.replica_id}",
                    f"{SECTION}.fault_tolerance.lighthouse={json.dumps(args.lighthouse)}"] + args.set
        args.out_dir = os.path.join(args.out_dir, f"replica{args.replica_id}")
    return args


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `[+]dotted.key=JSON` overrides; a value that is not JSON is taken as a string.

    Without `+` the key must already be in the file, so a misspelt key is refused with the
    closest existing one instead of being added and then ignored (DeepSpeed's Muon, for one,
    drops unknown params silently). `+` adds the key (or overrides it if present). Keys of
    our own section need no `+`: they have defaults, and the strict section parser refuses a
    misspelt one anyway.
    """
    for item in overrides:
        add = item.startswith("+")
        body = item[1:] if add else item
        key, sep, raw = body.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            raise ConfigError(f"--set '{item}' must look like dotted.key=value, e.g. optimizer.params.lr=0.01 "
                              f"(or +dotted.key=value to add a key the config does not have)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        may_add = add or parts[0] == SECTION
        node = config
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth + 1])
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:depth])} is {json.dumps(node)}, not a JSON "
                                  f"object, so it has no key '{part}'")
            if part not in node and not may_add:
                close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"--set {item}: {here} is not in the config{hint} (to add a new key on purpose, "
                                  f"write --set +{body})")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return config


def load_ds_config(args: argparse.Namespace) -> dict:
    config = apply_overrides(read_json(args.ds_config), args.set)
    # "auto" lets one JSON serve any --steps: the schedule length is the run's length.
    sched = config.get("scheduler") or {}
    params = sched.get("params") if isinstance(sched, dict) else None
    if isinstance(params, dict) and params.get("total_num_steps") == "auto":
        params["total_num_steps"] = args.steps
    return config


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run(args: argparse.Namespace, engine_ref: list[Any] | None = None) -> dict[str, Any]:
    """Build everything, train, evaluate; returns the final metrics (rank 0's view)."""
    ds_config = load_ds_config(args)
    # Pre-flight: everything checkable is checked before process groups exist, so a mistake is
    # one line from every rank alike (errors.report prints it once): first the config (before
    # torch is even imported), then the resume path, the model, the data; initialize() then
    # splits the model into fragments before its rendezvous.
    from .config import resolve, world_size_from_env

    _, cfg, num_replicas, _ = resolve(ds_config, world_size_from_env())
    check_resume_path(args)
    import torch

    from .data import EVAL_STREAM, TokenSplits, get_batch, load_tokens
    from .model import build_model

    overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head),
                                   ("block_size", args.block_size)) if v is not None}
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    block = model.cfg.block_size
    splits = TokenSplits.from_tokens(load_tokens(args.data, args.data_dtype, model.cfg.vocab_size),
                                     args.val_fraction, block)
    if not args.no_save:  # an unwritable or full disk is found now, not at the first save hours later
        from .checkpoint import preflight
        from .engine import estimate_checkpoint_nbytes

        preflight(os.path.join(args.out_dir, "checkpoints"),
                  *estimate_checkpoint_nbytes(model, ds_config, cfg, num_replicas))

    if not args.verbose:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.ERROR)
        # torchft (fault-tolerant runs): its Python INFO/WARN lines per quorum, and its Rust INFO
        # log, which env_logger reads from RUST_LOG when torchft is first imported.
        logging.getLogger("torchft").setLevel(logging.ERROR)
        os.environ.setdefault("RUST_LOG", "warn")
    import torch.distributed as dist

    from . import initialize
    from .metrics import make_logger, tensorboard_dir

    metrics = make_logger(tensorboard_dir(ds_config, os.path.join(args.out_dir, "tb")), launch_rank() == 0)
    engine, _, _, _ = initialize(model=model, config=ds_config, metrics=metrics)
    if engine_ref is not None:
        engine_ref.append(engine)
    from .comm.diagnose import start_responder

    start_responder(dist.get_rank(), lambda: engine.phase)  # names a dead or hung peer if a collective fails
    world, rank = dist.get_world_size(), dist.get_rank()
    stream = engine.topo.global_rank  # a replica job reads the data its ranks would read in one job
    micro = engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    device = engine.device
    tokens_per_step = micro * accum * block * world

    def evaluate() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [engine(*get_batch(splits.val, micro, block, args.seed, EVAL_STREAM, i, device)).float()
                      for i in range(rank, args.eval_batches * world, world)]
        engine.train()
        total = torch.stack([torch.stack(losses).sum(), torch.tensor(float(len(losses)), device=device)])
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    if rank == 0:
        mode = (f"K={engine.topo.num_replicas} x D={engine.topo.ranks_per_replica}, H={engine.cfg.sync_every}, "
                f"P={engine.cfg.num_fragments}, tau={engine.cfg.sync_delay}" if engine.cfg.enabled
                else f"data parallel over {world} ranks")
        print(f"[streaming_muloco] model {args.model}: {model.num_params():,} params | {mode} | "
              f"{tokens_per_step} tokens/step | logs: {metrics.log_dir}", flush=True)
    history: dict[str, Any] = {"train_loss": [], "eval_loss": []}
    first = 1
    if args.resume is not None:
        first = resume(engine, args) + 1
    if args.trace_syncs and engine.outer is not None and rank == 0:
        trace_syncs(engine, args.trace_syncs)
    first = engine.join_replicas(first - 1) + 1  # a fault-tolerant replica may start at its peers' step
    t_start = t_log = time.perf_counter()
    # Steady-state throughput leaves out the first steps, which pay one-off costs (torch.compile
    # of DeepSpeed's muon_update takes ~20 s on CPU) that would flatter any ratio of two runs.
    warm_until = first + min(5, max(0, (args.steps - first) // 5))
    t_warm = None
    loss_acc, loss_n = 0.0, 0
    step, ran, ran_at_warm = first, 0, 0
    while step <= args.steps:
        for micro_step in range(accum):
            x, y = get_batch(splits.train, micro, block, args.seed, stream, (step - 1) * accum + micro_step, device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            loss_acc += loss.item()
            loss_n += 1
        ran += 1
        if engine.inner_steps > step:  # healed at a sync (it had fallen behind): now at its peers' step
            step = engine.inner_steps
        if t_warm is None and step >= warm_until:
            t_warm, ran_at_warm = time.perf_counter(), ran
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            train_loss = loss_acc / loss_n
            tok_s = tokens_per_step * (args.log_every if step % args.log_every == 0 else step % args.log_every) \
                / max(now - t_log, 1e-9)
            eta = (now - t_start) / (step - first + 1) * (args.steps - step)
            history["train_loss"].append((step, train_loss))
            metrics.scalars({"train/loss": train_loss, "train/tokens_per_s": tok_s,
                             "train/tokens": step * tokens_per_step}, step)
            if rank == 0:
                print(f"step {step:>6}/{args.steps} | loss {train_loss:.4f} | {tok_s:,.0f} tok/s | "
                      f"ETA {fmt_time(eta)}", flush=True)
            loss_acc, loss_n, t_log = 0.0, 0, now
        if step % args.eval_every == 0 or step == args.steps:
            engine.phase = f"eval after inner step {step}"
            val = evaluate()
            history["eval_loss"].append((step, val))
            metrics.scalar("eval/loss", val, step)
            metrics.flush()
            if rank == 0:
                print(f"step {step:>6}/{args.steps} | eval loss {val:.4f} | tokens {step * tokens_per_step:,}",
                      flush=True)
        if not args.no_save and args.save_every and step % args.save_every == 0 and step != args.steps:
            save(engine, args.out_dir, step, args.keep_last)
        step += 1
    if not args.no_save and first <= args.steps:
        save(engine, args.out_dir, args.steps, args.keep_last)
    elapsed = time.perf_counter() - t_start
    result = {"final_eval_loss": history["eval_loss"][-1][1], "steps": args.steps, "seconds": elapsed,
              "tokens": args.steps * tokens_per_step, "history": history,
              "tokens_per_s": ran * tokens_per_step / elapsed, "steps_run": ran,
              "steady_tokens_per_s": ((ran - ran_at_warm) * tokens_per_step /
                                      (time.perf_counter() - t_warm)) if t_warm and ran > ran_at_warm else None,
              "peak_rss_mb": peak_rss_mb(), "num_params": model.num_params(),
              "outer_steps": engine.outer.outer_steps if engine.outer else 0}
    if engine.outer is not None:
        o = engine.outer
        result.update({**o.observer.summary(), "bytes_sent_per_rank": o.comm.bytes_sent,
                       "outer_state_bytes": o.state_nbytes(), "theta_g_sha256": theta_g_sha256(o)})
    if engine.membership is not None:
        result.update({"replica_id": engine.topo.replica_id, **engine.membership.stats.summary()})
        engine.membership.shutdown()
    from .comm.diagnose import stop_responder

    stop_responder()
    dist.barrier()  # rank 0 hosts the store the responders wait on: it must not leave before them
    if rank == 0:
        print(f"[streaming_muloco] done: {args.steps} steps in {fmt_time(elapsed)}, final eval loss "
              f"{result['final_eval_loss']:.4f}", flush=True)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        Path(args.out_dir, "result.json").write_text(json.dumps(result, indent=1))
    metrics.close()
    return result


def theta_g_sha256(outer: Any) -> str:
    """sha256 over the bytes of this rank's theta_g, all fragments in fragment order."""
    import hashlib

    h = hashlib.sha256()
    outer.store.synchronize()  # theta_g may still be copying back to host memory (outer_state.py)
    for f in outer.fragments:
        h.update(f.theta_g.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def trace_syncs(engine: Any, directory: str) -> None:
    """--trace-syncs: save theta_g of the fragment after each outer step (rank 0)."""
    import torch

    Path(directory).mkdir(parents=True, exist_ok=True)
    engine.outer.after_finish.append(
        lambda p, step, theta: torch.save(theta.detach().cpu().clone(), Path(directory, f"step{step}_frag{p}.pt")))


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(engine: Any, out_dir: str, step: int, keep_last: int = 0) -> None:
    engine.phase = f"checkpoint save at inner step {step}"
    engine.save_checkpoint(os.path.join(out_dir, "checkpoints"), step, keep_last=keep_last)


SCHEDULE_LENGTH = "scheduler.params.total_num_steps"


def _schedule_length_is_explicit(args: argparse.Namespace) -> bool:
    """True when the config (with --set) gives total_num_steps as a number, not "auto"
    (which load_ds_config resolves to --steps): an explicit change is a decision, not an accident."""
    sched = apply_overrides(read_json(args.ds_config), list(args.set)).get("scheduler")
    params = sched.get("params") if isinstance(sched, dict) else None
    return isinstance(params, dict) and params.get("total_num_steps", "auto") != "auto"


def check_resume_path(args: argparse.Namespace) -> None:
    """Refuse a --resume that cannot work before any process group starts, with the very checks
    (and messages) `checkpoint.load` applies later; checksums and topology are verified then,
    collectively."""
    if args.resume is None:
        return
    from .checkpoint import locate

    if args.resume == "auto":
        locate(Path(args.out_dir, "checkpoints"))  # nothing yet is fine: training starts at step 0
        return
    path = Path(args.resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume '{path}' is not a directory; pass a checkpoint step directory such as "
                              f"{args.out_dir}/checkpoints/step600, or --resume alone for the latest one in "
                              f"--out-dir")
    if locate(path) is None:
        raise CheckpointError(f"--resume '{path}' holds no checkpoint; point it at a step directory such as "
                              f"{args.out_dir}/checkpoints/step600, or leave --resume out to start from step 0")


def resume(engine: Any, args: argparse.Namespace) -> int:
    """Load the requested checkpoint; returns the inner step it holds (0: none yet)."""
    engine.phase = "checkpoint load"
    auto = args.resume == "auto"
    path = Path(args.out_dir, "checkpoints") if auto else Path(args.resume)
    step = engine.load_checkpoint(path, missing_ok=auto,
                                  may_change=(SCHEDULE_LENGTH,) if _schedule_length_is_explicit(args) else ())
    if step is None:
        if engine.topo.rank == 0:
            print(f"[streaming_muloco] --resume: no checkpoint in {path} yet; starting at step 0", flush=True)
        return 0
    found = engine.loaded_checkpoint.path
    if step >= args.steps:
        raise ConfigError(f"--steps ({args.steps}) must be larger than the step of the checkpoint resumed from "
                          f"('{found}' is at inner step {step}): there is nothing left to train")
    if engine.topo.rank == 0:
        print(f"[streaming_muloco] resumed from {found} at inner step {step}", flush=True)
    return step


def main(argv: list[str] | None = None) -> NoReturn:
    """Train, then leave through `exit_process` on every handled path, a finished run included."""
    engine_ref: list[Any] = []
    try:
        run(parse_args(argv), engine_ref)
    except UserError as e:
        # One line per job, no traceback: these are the user's to fix. errors.report decides
        # which rank prints (rank 0 for an error every rank raises, while the others wait).
        report(e)
        exit_process(e.exit_code, finished=False)
    except Exception as e:  # noqa: BLE001 - every rank must say where it stopped, then leave
        if not _is_comm_failure(e):
            raise
        from .comm.diagnose import peer_failure

        engine = engine_ref[0] if engine_ref else None
        err = peer_failure(e, launch_rank(), engine.phase if engine else "start-up", engine.topo if engine else None)
        report(err)  # a rank-local error: every survivor says where it stopped, and rank 0 may be the dead one
        exit_process(err.exit_code, finished=False)
    exit_process(0)


def _is_comm_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    from .comm.mpi_backend import PeerTimeoutError

    if isinstance(e, (PeerTimeoutError, dist.DistError, TimeoutError, ConnectionError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "connection", "timed out", "timeout",
                                                                   "nccl", "peer"))


if __name__ == "__main__":
    main()
