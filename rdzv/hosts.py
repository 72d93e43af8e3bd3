"""Whether a host name or address names this machine (torch-free).

One rule for the launcher's checks and the c10d backend's "who serves the store": a node
serves it when the endpoint's host is this machine.
"""

from __future__ import annotations

import functools
import ipaddress
import socket


@functools.cache
def _own_names() -> frozenset[str]:
    # getfqdn is a DNS lookup that can stall for seconds: asked once per process.
    return frozenset({"localhost", socket.gethostname(), socket.getfqdn()})


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_this_host(host: str) -> bool:
    """Whether `host` is this machine: localhost, a loopback address, our host name or FQDN,
    or a name or address (IPv6 in brackets or not) that resolves to a loopback address or to
    one this machine can bind (one of its interfaces)."""
    name = host.strip().strip("[]")
    if not name:
        return False
    if name in _own_names() or _is_loopback(name):
        return True
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        if _is_loopback(address):
            return True
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address, 0, *sockaddr[2:]))
        except OSError:
            continue
        return True
    return False
