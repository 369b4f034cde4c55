"""The coordinator of a fault-tolerant run: torchft's Lighthouse, in the foreground.

    python -m streaming_muloco.lighthouse --port 29510 --min-replicas 2

Replica jobs (`--replica-id k --lighthouse HOST:PORT`) heartbeat to it and ask it for a quorum
at every outer sync; it drops a replica whose heartbeats stop for --heartbeat-timeout-ms and
admits a new one at the next quorum (docs/design.md §6.1). It holds no training state, only
membership; replicas that cannot reach it for a quorum stop after fault_tolerance.quorum_timeout_s.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import NoReturn

from .errors import ConfigError, report
from .process_exit import exit_process


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _ArgumentParser(prog="python -m streaming_muloco.lighthouse", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=29510, help="port to listen on (0: any free port)")
    p.add_argument("--bind", default="[::]", help="address to bind (default: every interface)")
    p.add_argument("--min-replicas", type=int, required=True,
                   help="a quorum needs at least this many replicas (fault_tolerance.min_replicas of the jobs)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                   help="a replica whose heartbeats stop this long is dropped from the next quorum")
    p.add_argument("--join-timeout-ms", type=int, default=10000,
                   help="how long a quorum waits for a heartbeating replica that has not asked to join yet")
    p.add_argument("--quorum-tick-ms", type=int, default=100, help="how often a pending quorum is re-checked")
    p.add_argument("--verbose", action="store_true", help="torchft's INFO log: every quorum request and decision")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port ({args.port}) must be in [0, 65535]")
    for key in ("min_replicas", "heartbeat_timeout_ms", "join_timeout_ms", "quorum_tick_ms"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} ({getattr(args, key)}) must be >= 1")
    return args


def main(argv: list[str] | None = None) -> NoReturn:
    try:
        args = parse_args(argv)
        import os

        if not args.verbose:  # read by torchft's Rust logger when the module is first imported
            os.environ.setdefault("RUST_LOG", "warn")
        from torchft._torchft import LighthouseServer

        try:
            server = LighthouseServer(bind=f"{args.bind}:{args.port}", min_replicas=args.min_replicas,
                                      join_timeout_ms=args.join_timeout_ms, quorum_tick_ms=args.quorum_tick_ms,
                                      heartbeat_timeout_ms=args.heartbeat_timeout_ms)
        except Exception as e:  # noqa: BLE001 - the Rust side raises RuntimeError with the OS's reason
            raise ConfigError(f"cannot listen on {args.bind}:{args.port}: {str(e).strip().splitlines()[0]}; pick "
                              f"another --port") from None
    except ConfigError as e:
        report(e, rank=0)
        exit_process(e.exit_code, finished=False)
    port = server.address().rsplit(":", 1)[1]
    print(f"[streaming_muloco] lighthouse listening on {socket.gethostname()}:{port} (min_replicas "
          f"{args.min_replicas}); start replica jobs with --lighthouse {socket.gethostname()}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    sys.stdout.flush()
    exit_process(0)


if __name__ == "__main__":
    main()
