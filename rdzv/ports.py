"""Free ports for MASTER_PORT, chosen the way the TCPStore that will use them binds."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free now on every local address (offered as MASTER_PORT should we become rank 0).

    Bound on the wildcard address, dual-stack first, as torch (2.14+) does and as the workers'
    TCPStore server binds: a port free on loopback only may already be taken on another
    interface, and the server's bind would then fail.
    """
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((host, 0))
                return int(sock.getsockname()[1])
        except OSError:
            continue  # no IPv6 on this host
    raise OSError("no free port: cannot bind a socket on IPv6 or IPv4")
