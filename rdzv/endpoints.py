"""Endpoints as people write them: `HOST[:PORT]`, `[IPv6][:PORT]`, a bare IPv6 address, or an
http(s):// URL of one of those, alone or comma-separated; one parser with one set of messages for
the launcher, the rendezvous settings and the etcd client. Torch-free.
"""

from __future__ import annotations

import ipaddress
import re

ENDPOINT_FORMS = "expected HOST:PORT, [IPv6]:PORT or http(s)://HOST:PORT"
_HOST_RE = re.compile(r"[\w.-]+")


class EndpointError(ValueError):
    """An endpoint cannot be read; the message names it and says why."""


def split_endpoint(text: str, default_port: int | None) -> tuple[str, int | None, str]:
    """One endpoint -> (host, port, scheme): the port is `default_port` when absent, the scheme
    "" when none is given, and an IPv6 host comes without brackets."""
    item = text.strip()
    rest, scheme = item, ""
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise EndpointError(f"endpoint {item!r}: the scheme must be http or https")
        rest = rest.rstrip("/")
    port_text: str | None = None
    ipv6 = False
    if rest.startswith("["):
        host, closed, after = rest[1:].partition("]")
        if not closed or (after and not after.startswith(":")):
            raise EndpointError(f"cannot read endpoint {item!r} ({ENDPOINT_FORMS})")
        port_text = after[1:] if after else None
        ipv6 = _is_ipv6(host)
        if not ipv6:
            raise EndpointError(f"endpoint {item!r}: {host!r} in brackets is not an IPv6 address")
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    elif ":" in rest:
        host, ipv6 = rest, _is_ipv6(rest)  # a bare IPv6 address, or something like host:port:x
        if not ipv6:
            raise EndpointError(f"cannot read endpoint {item!r} ({ENDPOINT_FORMS})")
    else:
        host = rest
    if not host:
        raise EndpointError(f"endpoint {item!r} names no host ({ENDPOINT_FORMS})")
    if not ipv6 and not _HOST_RE.fullmatch(host):
        raise EndpointError(f"endpoint {item!r}: {host!r} is not a host name or address")
    if port_text is None:
        return host, default_port, scheme
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise EndpointError(f"{port_text!r} in {item!r} is not a port number")
    return host, int(port_text), scheme


def split_endpoint_list(text: str, default_port: int | None) -> list[tuple[str, int | None, str]]:
    """`e1,e2,...` (each as split_endpoint reads it); an empty item is an error."""
    items = text.split(",")
    if not all(item.strip() for item in items):
        raise EndpointError(
            f"endpoint list {text.strip()!r} has an empty item (expected HOST:PORT[,HOST:PORT...])"
        )
    return [split_endpoint(item, default_port) for item in items]


def join_host_port(host: str, port: int | None) -> str:
    """"host:port", with an IPv6 host in brackets ("[::1]:2379"), as dialled and shown."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalized(endpoint: str | None, default_port: int) -> tuple[tuple[str, ...], bool]:
    """`host:port[,host:port]` or URLs -> ("host:port", ...), and whether any URL asked for TLS.
    No endpoint at all means localhost, as in torch."""
    if not (endpoint or "").strip():
        return (join_host_port("localhost", default_port),), False
    out: list[str] = []
    tls = False
    for host, port, scheme in split_endpoint_list(str(endpoint), default_port):
        tls = tls or scheme == "https"
        out.append(join_host_port(host, port))
    return tuple(out), tls


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
