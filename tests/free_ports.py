"""Free TCP ports for the servers the tests start (Ray heads, Serve, moto's S3)."""

from __future__ import annotations

import contextlib
import random
import socket
from typing import Tuple

# Ray's workers bind 10002-19999 by default (min/max_worker_port): the pick starts above them.
LOWEST = 20000


def _ephemeral_range() -> Tuple[int, int]:
    """The range bind(0) and outgoing connections draw from (Linux; its default elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports that are free now, below the ephemeral range where it leaves room.

    A port picked by bind(0) and released goes back to the pool every later bind(0) draws from,
    and a Ray head binds several servers on port 0 while its slower processes are still
    starting: in CI the raylet took the port chosen for the head's Ray Client server, that server
    died on "Address already in use", `ray start --block` tore the head down, and the test's
    driver left pytest 60 s later with _exit(1). A port below the range is taken only by asking
    for it by number. The sockets stay bound until all are chosen, so the ports are distinct.
    """
    low, _ = _ephemeral_range()
    candidates = range(LOWEST, low) if low - LOWEST >= 1000 else None
    # Not the `random` module's shared state: tests seed it, and two seeded runs would pick alike.
    pick = random.SystemRandom()
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(200 * n):
            if len(ports) == n:
                break
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("", pick.choice(candidates) if candidates else 0))
            except OSError:  # taken (or in TIME_WAIT): try another
                continue
            ports.append(s.getsockname()[1])
        if len(ports) < n:
            raise RuntimeError(f"found only {len(ports)} of {n} free ports in {candidates}")
        return ports
