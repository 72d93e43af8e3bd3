"""MASTER_PORT candidates are free on every local address, as the TCPStore server binds them."""

from __future__ import annotations

import socket

from rdzv.ports import free_port


def test_free_port_is_free_on_the_wildcard_of_both_families() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
        v4.bind(("0.0.0.0", port))
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::", port))


def test_a_tcpstore_serves_on_it() -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = free_port()
    server = TCPStore("localhost", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert server.get("k") == b"v"
