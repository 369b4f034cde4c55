"""Bandwidth-limited links between processes on one machine (Linux network namespaces, as root).

N "nodes" (namespaces smn0..smn{N-1}, addresses 10.78.0.1..N) hang off a bridge that lives in
its own namespace, so the host's network is untouched. Each node's link is shaped with `tbf`
in both directions (node egress and bridge egress into the node): N hosts with full-duplex NICs
of RATE behind a non-blocking switch. The kernel here has no netem, so there is rate shaping
but no added latency.

    python benchmarks/netns.py up 2 100mbit      # build and check the achieved rate
    python benchmarks/netns.py down              # tear down (also done by `Link` on any exit)

From Python: `with Link(2, "100mbit") as link: link.run_ranks([...argv...])`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PFX, BRIDGE_NS, SUBNET = "smn", "smnbr", "10.78.0"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def rate_bits(rate: str) -> int:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    for unit, mult in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * mult)
    raise ValueError(f"rate '{rate}' must end in kbit, mbit or gbit")


def shape(ns: str, dev: str, rate: str) -> None:
    bits = rate_bits(rate)
    burst = max(bits // 8 // 100, 65536)  # >= rate/HZ with slack
    limit = max(bits // 8 * 20 // 1000, 2 * burst)  # ~20 ms of queue: low bufferbloat
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
       "burst", str(burst), "limit", str(limit))


def down() -> None:
    namespaces = sh("ip", "netns", "list", check=False).stdout.split()
    for ns in namespaces:
        if ns == BRIDGE_NS or (ns.startswith(PFX) and ns[len(PFX):].isdigit()):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)


def up(n: int, rate: str) -> None:
    if os.geteuid() != 0:
        raise PermissionError("network namespaces need root: run as root (or with sudo)")
    down()
    sh("ip", "netns", "add", BRIDGE_NS)
    sh("ip", "-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", BRIDGE_NS, "link", "set", "br0", "up")
    for i in range(n):
        ns = f"{PFX}{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", BRIDGE_NS, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", BRIDGE_NS, "link", "set", f"p{i}", "master", "br0")
        sh("ip", "-n", BRIDGE_NS, "link", "set", f"p{i}", "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        if rate != "none":
            shape(ns, "eth0", rate)
            shape(BRIDGE_NS, f"p{i}", rate)


def measure_mbit(seconds: float = 2.0) -> float:
    """Achieved TCP rate node1 -> node0, in Mbit/s, measured with a plain socket sender."""
    server = ("import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
              f"s.bind(('{SUBNET}.1',5999));s.listen(1);c,_=s.accept();n=0;t=None\n"
              "while True:\n b=c.recv(1<<20)\n if not b: break\n"
              " t=t or time.perf_counter();n+=len(b)\n"
              "print(n*8/(time.perf_counter()-t)/1e6)")
    client = ("import socket,time;s=socket.socket()\n"
              f"for _ in range(50):\n try: s.connect(('{SUBNET}.1',5999)); break\n except OSError: time.sleep(0.1)\n"
              f"buf=b'x'*(1<<16);end=time.perf_counter()+{seconds}\n"
              "while time.perf_counter()<end: s.sendall(buf)\ns.close()")
    srv = subprocess.Popen(["ip", "netns", "exec", f"{PFX}0", sys.executable, "-c", server], stdout=subprocess.PIPE,
                           text=True)
    sh("ip", "netns", "exec", f"{PFX}1", sys.executable, "-c", client)
    out, _ = srv.communicate(timeout=30)
    return float(out.strip())


class Link:
    """Context manager: shaped namespaces up on entry, always down on exit."""

    _runs = 0

    def __init__(self, n: int, rate: str) -> None:
        self.n, self.rate = n, rate

    def __enter__(self) -> "Link":
        up(self.n, self.rate)
        return self

    def __exit__(self, *exc: object) -> None:
        down()

    def run_ranks(self, argv: list[str], env: dict | None = None, timeout: float = 600,
                  cwd: str | Path | None = None) -> list[tuple[int, str]]:
        """One rank per namespace (torch env rendezvous at node 0); returns [(rc, output)]."""
        Link._runs += 1  # a fresh rendezvous port per job: no clash with a closing socket
        port = 29500 + (os.getpid() % 500) + 500 * (Link._runs % 20)
        procs = []
        for i in range(self.n):
            e = dict(os.environ)
            e.update(env or {})
            e.update({"RANK": str(i), "LOCAL_RANK": "0", "WORLD_SIZE": str(self.n), "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": f"{SUBNET}.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "eth0"})
            procs.append(subprocess.Popen(["ip", "netns", "exec", f"{PFX}{i}", sys.executable, *argv], env=e, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs: list[tuple[int, str]] = [(0, "")] * self.n

        def collect(i: int) -> None:
            out, _ = procs[i].communicate()
            outs[i] = (procs[i].returncode, out)

        threads = [threading.Thread(target=collect, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            for p in procs:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {timeout}s")
        return outs


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "down", "measure"):
        print("usage: netns.py up N RATE | measure | down", file=sys.stderr)
        return 2
    if argv[0] == "down":
        down()
        return 0
    if argv[0] == "up":
        up(int(argv[1]), argv[2])
    print(f"achieved {measure_mbit():.1f} Mbit/s node1 -> node0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
