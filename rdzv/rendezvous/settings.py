"""Settings shared by every backend, parsed once from torch's `RendezvousParameters`.

Key names follow `--rdzv-conf`; torch's spellings are accepted as aliases so a torchrun command
line keeps working when only the backend name changes. Everything here is torch-free: the
launcher checks run ids, `--rdzv-conf` and endpoints with it before torch loads.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from rdzv.endpoints import EndpointError, normalized

if TYPE_CHECKING:  # annotations only: `rdzv status` reads passwords here without torch
    from torch.distributed.elastic.rendezvous import RendezvousParameters

# Sized for thousands of nodes: a lost node is noticed within `lease_ttl`, keep-alives are one
# small message per node every lease_ttl/3, and a join may wait for slow schedulers.
DEFAULT_JOIN_TIMEOUT = 600.0
DEFAULT_LAST_CALL_TIMEOUT = 30.0
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

# Every key --rdzv-conf may hold, and how its value is checked ("number": finite and >= 0,
# "count": a whole number >= 0, "bool", "text"). Unknown keys are refused: a misspelt one would
# silently run with the default.
_NUMBER, _COUNT, _BOOL, _TEXT = "number", "count", "bool", "text"
KNOWN_KEYS: dict[str, str] = {
    # ours (with torch's spellings as aliases)
    "join_timeout": _NUMBER, "timeout": _NUMBER, "last_call_timeout": _NUMBER,
    "lease_ttl": _NUMBER, "read_timeout": _NUMBER,
    "store_ttl": _NUMBER,  # etcd-v2: lifetime of the round store's keys
    "prefix": _TEXT, "etcd_prefix": _TEXT, "rank": _COUNT, "node_rank": _COUNT,
    "cacert": _TEXT, "ca_cert": _TEXT, "cert": _TEXT, "ssl_cert": _TEXT, "key": _TEXT,
    "ssl_cert_key": _TEXT, "protocol": _TEXT, "user": _TEXT, "username": _TEXT,
    "password_env": _TEXT, "password_file": _TEXT, "is_host": _BOOL,
    # passed by launchers: rdzv-launch (shown by `rdzv status`; with `role`, they tell whether
    # every node runs the same workers)
    "local_world_size": _COUNT, "role": _TEXT,
    # segments and quarantine (rdzv.rendezvous.segments, rdzv.rendezvous.quarantine); `segment`
    # is this node's label (rdzv-launch passes --node-segment)
    "segment": _TEXT, "segment_size": _COUNT, "quarantine_after": _COUNT, "quarantine_ttl": _NUMBER,
    # read only by torch's own handlers (c10d, etcd, etcd-v2, static, dynamic): accepted so a
    # torchrun command line keeps working; ours ignore them
    "close_timeout": _NUMBER,  # torch's dynamic handler (c10d): checked as it checks it (> 0)
    "heartbeat_timeout": _NUMBER, "keep_alive_interval": _NUMBER, "keep_alive_max_attempt": _COUNT,
    "heartbeat": _NUMBER,  # the short name docs/migration.md has always accepted
    "cas_backoff_max_seconds": _NUMBER, "store_type": _TEXT, "use_libuv": _BOOL,
}
_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")
_PASSWORD_MESSAGE = (
    "the etcd password is not accepted on the command line; set RDZV_ETCD_PASSWORD "
    "or pass password_env=NAME / password_file=PATH in --rdzv-conf"
)

# Run ids name etcd keys (`<prefix>/<run_id>/...`) and torch's log directories: no '/', no
# leading '.' or '-', short enough for a file name with torch's suffix.
RUN_ID_MAX_LEN = 128
_RUN_ID_CHAR = re.compile(r"[A-Za-z0-9_.-]")
RUN_ID_RULE = (
    f"a run id is 1 to {RUN_ID_MAX_LEN} letters, digits, '_', '.' or '-', "
    "and does not start with '.' or '-'"
)


@functools.cache
def _fqdn() -> str:
    # A DNS lookup; resolvers can stall for seconds, and every handler in a process asks.
    return socket.getfqdn()


class ConfigError(ValueError):
    """A rendezvous setting is malformed; the message names the key."""


def check_run_id(run_id: object) -> str:
    """Return `run_id` if it follows RUN_ID_RULE, else raise ConfigError saying what is wrong.

    The one check for the library, the torchrun plugins, rdzv-launch and `rdzv status/clean`:
    with '/' refused, no run's keys can lie under another run's prefix.
    """
    if run_id is None or run_id == "":
        raise ConfigError("a run id is required (--rdzv-id)")
    if not isinstance(run_id, str):
        raise ConfigError(f"run id {run_id!r} is not a string; {RUN_ID_RULE}")
    shown = repr(run_id if len(run_id) <= 40 else run_id[:40] + "...")
    if len(run_id) > RUN_ID_MAX_LEN:
        raise ConfigError(f"run id {shown} is {len(run_id)} characters long; {RUN_ID_RULE}")
    bad = next((c for c in run_id if not _RUN_ID_CHAR.fullmatch(c)), None)
    if bad is not None:
        raise ConfigError(f"run id {shown} contains {bad!r}; {RUN_ID_RULE}")
    if run_id[0] in ".-":
        raise ConfigError(f"run id {shown} starts with {run_id[0]!r}; {RUN_ID_RULE}")
    return run_id


def check_config_key(key: str) -> None:
    """Raise ConfigError for a key --rdzv-conf must not hold: a password, or an unknown key
    (named with the nearest known one)."""
    if key in KNOWN_KEYS:
        return
    if "pass" in key.lower() or key.lower() in ("pwd", "secret"):
        raise ConfigError(f"rendezvous setting {key!r}: {_PASSWORD_MESSAGE}")
    near = difflib.get_close_matches(key.replace("-", "_").lower(), KNOWN_KEYS, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?" if near else "see the settings table in docs/rendezvous.md"
    raise ConfigError(f"unknown rendezvous setting {key!r}; {hint}")


def check_config(config: Mapping[str, object]) -> None:
    """Check every key and value of a rendezvous configuration (torch-free, fast); ConfigError
    names the first bad one."""
    for key, raw in config.items():
        check_config_key(key)
        if raw is None or raw == "":
            continue
        kind = KNOWN_KEYS[key]
        if kind == _NUMBER:
            _number(key, raw)
        elif kind == _COUNT:
            _count(key, raw)
        elif kind == _BOOL:
            _bool(key, raw)
    protocol = str(config.get("protocol") or "").strip().lower()
    if protocol not in ("", "http", "https"):
        raise ConfigError(f"rendezvous setting protocol={protocol!r} must be http or https")


def _number(key: str, raw: object) -> float:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"rendezvous setting {key}={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"rendezvous setting {key}={raw!r} must be a finite number, 0 or more")
    return value


def _count(key: str, raw: object) -> int:
    try:
        value = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"rendezvous setting {key}={raw!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"rendezvous setting {key}={raw!r} must be 0 or more")
    return value


def config_number(config: Mapping[str, object], key: str) -> float | None:
    """The number `config` holds at `key` (a finite number, 0 or more), None if not given."""
    raw = config.get(key)
    return None if raw is None or raw == "" else _number(key, raw)


def config_bool(config: Mapping[str, object], key: str) -> bool | None:
    """The boolean `config` holds at `key` (true/false, 1/0, ...), None if not given."""
    raw = config.get(key)
    return None if raw is None or raw == "" else _bool(key, raw)


def _bool(key: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"rendezvous setting {key}={raw!r} is not a boolean (true/false, 1/0)")


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
    value = _number(name, raw)
    if value <= 0:
        raise ConfigError(f"rendezvous setting {name}={raw!r} must be > 0 seconds")
    return value


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
class EtcdAccess:
    """How to reach etcd beyond its endpoints: TLS files and authentication (only the etcd
    backends have any; the TCPStore backends refuse a job that asks for them)."""

    tls: bool = False
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def secured(self) -> bool:
        """TLS or authentication asked for."""
        return self.tls or self.user is not None


@dataclass(frozen=True)
class RendezvousSettings:
    """One handler's settings, as parsed from torch's `RendezvousParameters` (`parse_settings`)."""

    backend: str
    run_id: str
    endpoints: tuple[str, ...]
    min_nodes: int
    max_nodes: int
    local_addr: str
    local_addr_given: str | None = None
    join_timeout: float = DEFAULT_JOIN_TIMEOUT
    last_call_timeout: float = DEFAULT_LAST_CALL_TIMEOUT
    lease_ttl: float = DEFAULT_LEASE_TTL
    read_timeout: float = DEFAULT_READ_TIMEOUT
    prefix: str = DEFAULT_PREFIX
    rank_hint: int | None = None
    local_world_size: int | None = None  # shown by `rdzv status`; the launcher passes it
    role: str | None = None  # the workers' role; the launcher passes it
    access: EtcdAccess = EtcdAccess()
    # --rdzv-conf as given (checked by check_config), read-only: a backend reads the keys only
    # it knows (etcd-v2's store_ttl, c10d's is_host) into typed values in its create_backend.
    config: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @property
    def run_prefix(self) -> str:
        return f"{self.prefix}/{self.run_id}"


def parse_endpoints(endpoint: str | None, default_port: int) -> tuple[tuple[str, ...], bool]:
    """`host:port[,host:port]` or URLs -> ("host:port", ...), and whether any URL asked for TLS
    (`rdzv.endpoints.normalized`); an endpoint that cannot be read is a ConfigError."""
    try:
        return normalized(endpoint, default_port)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None


def _optional_count(params: RendezvousParameters, name: str) -> int | None:
    raw = _lookup(params, name)
    return None if raw is None else _count(name, raw)


def parse_settings(
    params: RendezvousParameters, default_port: int = 2379, *, config_checked: bool = False
) -> RendezvousSettings:
    """A handler's settings from `params`; ConfigError names the first bad one. `config_checked`:
    the caller ran `check_config` on `params.config` already (rdzv-launch, in its one pass over
    the command line), so it is not checked a second time; every other caller leaves it False."""
    run_id = check_run_id(params.run_id)
    if not config_checked:
        check_config(params.config)
    endpoints, url_tls = parse_endpoints(params.endpoint, default_port)
    protocol = str(params.config.get("protocol") or "").strip().lower()
    cacert = _lookup(params, "cacert")
    prefix = str(_lookup(params, "prefix") or DEFAULT_PREFIX).rstrip("/")
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    user = params.config.get("user") or params.config.get("username")
    lease_ttl = _seconds(params, "lease_ttl", DEFAULT_LEASE_TTL)
    # torch's close_timeout: nothing here waits on a close, but a value torch refuses is refused.
    _seconds(params, "close_timeout", 1.0)
    if lease_ttl < 2:
        raise ConfigError(f"rendezvous setting lease_ttl={lease_ttl} must be at least 2 seconds")
    return RendezvousSettings(
        backend=params.backend,
        run_id=run_id,
        endpoints=endpoints,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        local_addr=params.local_addr or _fqdn(),
        local_addr_given=params.local_addr or None,
        join_timeout=_seconds(params, "join_timeout", DEFAULT_JOIN_TIMEOUT),
        last_call_timeout=_seconds(params, "last_call_timeout", DEFAULT_LAST_CALL_TIMEOUT),
        lease_ttl=lease_ttl,
        read_timeout=_seconds(params, "read_timeout", DEFAULT_READ_TIMEOUT),
        prefix=prefix,
        rank_hint=_optional_count(params, "rank_hint"),
        local_world_size=_optional_count(params, "local_world_size"),
        role=str(params.config.get("role") or "") or None,
        access=EtcdAccess(
            tls=url_tls or protocol == "https" or bool(cacert),
            cacert=str(cacert) if cacert else None,
            cert=str(_lookup(params, "cert")) if _lookup(params, "cert") else None,
            key=str(_lookup(params, "key")) if _lookup(params, "key") else None,
            user=str(user) if user else None,
            # From the environment or a file: check_config refused `password=` on the command line.
            password=password_from(params.config) if user else None,
        ),
        config=MappingProxyType(dict(params.config)),
    )
