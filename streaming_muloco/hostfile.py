"""Check a DeepSpeed hostfile before the launcher sees it.

The launcher's own parser fails deep in its stack on a typo; this names the line and the fix.
    python -m streaming_muloco.hostfile launch/hostfile.example [--summary]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import HostfileError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)\s+slots=(?P<slots>\d+)\s*$")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """[(host, slots)] in file order; comments (#) and blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise HostfileError(f"hostfile '{path}' does not exist")
    hosts: list[tuple[str, int]] = []
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HostfileError(f"hostfile '{path}' line {lineno}: '{raw.strip()}' must look like "
                                f"'<hostname> slots=<N>'")
        host, slots = m["host"], int(m["slots"])
        if slots < 1:
            raise HostfileError(f"hostfile '{path}' line {lineno}: slots must be >= 1")
        if host in dict(hosts):
            raise HostfileError(f"hostfile '{path}' line {lineno}: host '{host}' is listed twice")
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"hostfile '{path}' lists no hosts")
    return hosts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m streaming_muloco.hostfile HOSTFILE [--summary]", file=sys.stderr)
        return 2
    try:
        hosts = parse_hostfile(argv[0])
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "--summary" in argv:
        slots = {s for _, s in hosts}
        if len(slots) != 1:
            print(f"error: hostfile '{argv[0]}' gives hosts different slot counts {sorted(slots)}; every node "
                  f"needs the same number of ranks", file=sys.stderr)
            return 2
        print(len(hosts), slots.pop(), hosts[0][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
