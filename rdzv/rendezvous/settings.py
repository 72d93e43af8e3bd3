"""Settings shared by every backend, parsed once from torch's `RendezvousParameters`.

Key names follow `--rdzv-conf`; torch's spellings are accepted as aliases so a torchrun command
line keeps working when only the backend name changes.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `rdzv status` reads passwords here without torch
    from torch.distributed.elastic.rendezvous import RendezvousParameters

# Sized for thousands of nodes: a lost node is noticed within `lease_ttl`, keep-alives are one
# small message per node every lease_ttl/3, and a join may wait for slow schedulers.
DEFAULT_JOIN_TIMEOUT = 600.0
DEFAULT_LAST_CALL_TIMEOUT = 30.0
DEFAULT_CLOSE_TIMEOUT = 30.0
DEFAULT_LEASE_TTL = 10.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_PREFIX = "/rdzv"

# conf key -> accepted aliases (torch's etcd, etcd-v2 and c10d handlers each spell some differently)
_ALIASES: dict[str, tuple[str, ...]] = {
    "join_timeout": ("join_timeout", "timeout"),
    "cacert": ("cacert", "ca_cert"),
    "cert": ("cert", "ssl_cert"),
    "key": ("key", "ssl_cert_key"),
    "prefix": ("prefix", "etcd_prefix"),
    "rank_hint": ("rank", "node_rank"),
}


@functools.cache
def _fqdn() -> str:
    # A DNS lookup; resolvers can stall for seconds, and every handler in a process asks.
    return socket.getfqdn()


class ConfigError(ValueError):
    """A rendezvous setting is malformed; the message names the key."""


def _lookup(params: RendezvousParameters, name: str) -> object | None:
    for alias in _ALIASES.get(name, (name,)):
        value = params.config.get(alias)
        if value is not None and value != "":
            return value
    return None


def _seconds(params: RendezvousParameters, name: str, default: float) -> float:
    raw = _lookup(params, name)
    if raw is None:
        return default
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"rendezvous setting {name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"rendezvous setting {name}={raw!r} must be > 0 seconds")
    return value


def _read_password(params: RendezvousParameters) -> str | None:
    """The password comes from the environment or a file, never from the command line."""
    if params.config.get("password") not in (None, ""):
        raise ConfigError(
            "the etcd password is not accepted on the command line; set RDZV_ETCD_PASSWORD "
            "or pass password_env=NAME / password_file=PATH in --rdzv-conf"
        )
    return password_from(params.config)


def password_from(config: Mapping[str, object]) -> str | None:
    """`password_file=PATH`, else the variable named by `password_env` (RDZV_ETCD_PASSWORD)."""
    env_name = str(config.get("password_env") or "RDZV_ETCD_PASSWORD")
    path = config.get("password_file")
    if path:
        try:
            with open(str(path), encoding="utf-8") as fh:
                return fh.read().strip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read password_file {path}: {exc.strerror}") from None
    return os.environ.get(env_name)


@dataclass(frozen=True)
class RendezvousSettings:
    backend: str
    run_id: str
    endpoints: tuple[str, ...]
    min_nodes: int
    max_nodes: int
    local_addr: str
    local_addr_given: str | None = None
    join_timeout: float = DEFAULT_JOIN_TIMEOUT
    last_call_timeout: float = DEFAULT_LAST_CALL_TIMEOUT
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    lease_ttl: float = DEFAULT_LEASE_TTL
    read_timeout: float = DEFAULT_READ_TIMEOUT
    prefix: str = DEFAULT_PREFIX
    rank_hint: int | None = None
    local_world_size: int | None = None  # shown by `rdzv status`; the launcher passes it
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    tls: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    extra: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def run_prefix(self) -> str:
        return f"{self.prefix}/{self.run_id}"


def parse_endpoints(endpoint: str, default_port: int) -> tuple[tuple[str, ...], bool]:
    """`host:port[,host:port]` or URLs -> ("host:port", ...), and whether any URL asked for TLS."""
    items = [item.strip() for item in (endpoint or "").split(",") if item.strip()]
    if not items:
        items = [f"localhost:{default_port}"]
    out: list[str] = []
    tls = False
    for item in items:
        scheme, sep, rest = item.partition("://")
        if sep:
            if scheme not in ("http", "https"):
                raise ConfigError(f"endpoint {item!r}: scheme must be http or https")
            tls = tls or scheme == "https"
            item = rest.rstrip("/")
        host, port = _split_host_port(item, default_port)
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return tuple(out), tls


def _split_host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # bracketed IPv6
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not port_text:
        return host or "localhost", default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"endpoint {item!r}: port {port_text!r} is not a number") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"endpoint {item!r}: port {port} out of range")
    return host or "localhost", port


def _optional_int(params: RendezvousParameters, name: str) -> int | None:
    raw = _lookup(params, name)
    if raw is None:
        return None
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"rendezvous setting {name}={raw!r} is not an integer") from None


def parse_settings(params: RendezvousParameters, default_port: int = 2379) -> RendezvousSettings:
    if not params.run_id:
        raise ConfigError("a run id is required (--rdzv-id)")
    endpoints, url_tls = parse_endpoints(params.endpoint, default_port)
    protocol = str(params.config.get("protocol") or "").lower()
    if protocol not in ("", "http", "https"):
        raise ConfigError(f"rendezvous setting protocol={protocol!r} must be http or https")
    rank_raw = _lookup(params, "rank_hint")
    rank_hint: int | None = None
    if rank_raw is not None:
        try:
            rank_hint = int(rank_raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"rank hint {rank_raw!r} is not an integer") from None
        if rank_hint < 0:
            rank_hint = None
    cacert = _lookup(params, "cacert")
    prefix = str(_lookup(params, "prefix") or DEFAULT_PREFIX).rstrip("/")
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    user = params.config.get("user") or params.config.get("username")
    lease_ttl = _seconds(params, "lease_ttl", DEFAULT_LEASE_TTL)
    if lease_ttl < 2:
        raise ConfigError(f"rendezvous setting lease_ttl={lease_ttl} must be at least 2 seconds")
    return RendezvousSettings(
        backend=params.backend,
        run_id=params.run_id,
        endpoints=endpoints,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        local_addr=params.local_addr or _fqdn(),
        local_addr_given=params.local_addr or None,
        join_timeout=_seconds(params, "join_timeout", DEFAULT_JOIN_TIMEOUT),
        last_call_timeout=_seconds(params, "last_call_timeout", DEFAULT_LAST_CALL_TIMEOUT),
        close_timeout=_seconds(params, "close_timeout", DEFAULT_CLOSE_TIMEOUT),
        lease_ttl=lease_ttl,
        read_timeout=_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT),
        prefix=prefix,
        rank_hint=rank_hint,
        local_world_size=_optional_int(params, "local_world_size"),
        cacert=str(cacert) if cacert else None,
        cert=str(_lookup(params, "cert")) if _lookup(params, "cert") else None,
        key=str(_lookup(params, "key")) if _lookup(params, "key") else None,
        tls=url_tls or protocol == "https" or bool(cacert),
        user=str(user) if user else None,
        password=_read_password(params) if user else None,
        extra=dict(params.config),
    )
