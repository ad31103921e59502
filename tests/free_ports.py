"""Free TCP ports for the servers the tests start (Ray heads, Serve, moto's S3)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports that are free now. The sockets stay bound until all are chosen: one at
    a time, the OS may hand back a port it just released, and Ray refuses two components on one port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
