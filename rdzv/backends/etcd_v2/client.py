"""etcd's v2 HTTP API through python-etcd: a process-shared client with endpoint failover, and
the one place where its errors become torch's rendezvous errors (`v2_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import etcd
import urllib3
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import StoreBusyError, StoreUnreachableError
from rdzv.etcd.probe import accepts_connections, mismatch_hint
from rdzv.rendezvous.settings import RendezvousSettings
from rdzv.shared_clients import SharedClients

log = logging.getLogger("rdzv")
# python-etcd logs every failed request at ERROR before raising; we translate and report the
# error ourselves (with the endpoint and what to do), so its own log lines are only noise.
logging.getLogger("etcd.client").setLevel(logging.CRITICAL)

T = TypeVar("T")

POOL_SIZE = 64  # pooled HTTP connections per endpoint: concurrent long polls + requests
# urllib3 repeats a request that timed out reading (3 times by default), so one request to an
# endpoint that accepts but never answers took 4 x read_timeout. One try per endpoint; failover
# and the rendezvous's own retries do the rest.
RETRIES = urllib3.util.Retry(total=2, connect=2, read=False, redirect=2, other=0)
# How long a protocol probe's verdict on an endpoint holds, and its bound (as the v3 client's).
PROBE_HOLDS = 30.0
PROBE_TIMEOUT = 1.0
# What a hang-up looks like when only one side speaks TLS (client side TLS, plain).
_TLS_HANGUP = ("eof occurred", "unexpected_eof", "wrong version number")
_PLAIN_HANGUP = ("remote end closed", "connection aborted", "connection reset")
REMOVED = ("delete", "expire", "compareAndDelete")


class EtcdV2Error(Exception):
    """An etcd v2 request failed in a way callers do not handle (translated for messages)."""


class EtcdV2UnreachableError(EtcdV2Error):
    """No endpoint answered (refused, timed out): may well work later."""


class EtcdV2SilentError(EtcdV2UnreachableError):
    """An endpoint accepted the connection and did not answer in time (a stalled etcd), as
    opposed to refusing it: worth waiting for even before a node has joined."""


def whole_seconds(seconds: float) -> int:
    """v2 TTLs are whole seconds; never round a TTL down to less than asked."""
    return max(1, math.ceil(seconds))


def index_of(error: etcd.EtcdException) -> int:
    """The etcd index an error response carries (where to watch from after it)."""
    payload = error.payload if isinstance(error.payload, dict) else {}
    return int(payload.get("index") or 0)


def no_v2_api(error: BaseException) -> bool:
    payload = getattr(error, "payload", None)
    cause = str(payload.get("cause", "")) if isinstance(payload, dict) else ""
    return "404" in cause and "page not found" in cause


class EtcdV2Client:
    """python-etcd clients, one per endpoint, used in turn: a connection failure moves to the
    next endpoint (python-etcd's own failover forgets endpoints it failed on), and each request
    is bounded by `timeout`. Shared per process and configuration, reference-counted."""

    def __init__(self, settings: RendezvousSettings) -> None:
        self.endpoints = settings.endpoints
        self.timeout = settings.read_timeout
        access = settings.access
        self._tls = access.tls
        self._probed: dict[int, tuple[float, str | None]] = {}  # index -> (valid until, hint)
        cert: str | tuple[str, str] | None = access.cert
        if access.cert and access.key:
            cert = (access.cert, access.key)
        self._clients = [
            etcd.Client(
                host=host,
                port=port,
                protocol="https" if access.tls else "http",
                read_timeout=settings.read_timeout,
                cert=cert,
                ca_cert=access.cacert,
                username=access.user,
                password=access.password,
                per_host_pool_size=POOL_SIZE,
            )
            for host, port in map(_host_port, settings.endpoints)
        ]
        for client in self._clients:
            # Read by urllib3 when it creates a connection pool, i.e. before the first request.
            client.http.connection_pool_kw["retries"] = RETRIES
        self._current = 0
        self._forked = False  # inherited across fork(): see _disown
        _clients.track(self)

    @classmethod
    def shared(cls, settings: RendezvousSettings) -> EtcdV2Client:
        """A process-wide client per endpoints, TLS/auth and timeout, reference-counted: every
        caller must :meth:`close` its reference."""
        key = (settings.endpoints, settings.access, settings.read_timeout)
        return _clients.acquire(key, lambda: cls(settings))

    def close(self) -> None:
        if self._forked:
            return  # the parent's sockets: closing them here is not ours to do
        if not _clients.release(self):
            return
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.http.clear()

    def describe(self) -> str:
        return f"etcd {','.join(self.endpoints)} (v2 API)"

    def call(self, op: Callable[[etcd.Client], T]) -> T:
        """Run `op` on the current endpoint, moving on to the others on connection failures."""
        if self._forked:
            raise EtcdV2Error(
                "this etcd v2 client belongs to the parent process (created before fork()); "
                "create a new handler in this process"
            )
        failures: list[str] = []
        mismatched: list[str] = []
        silent = False  # some member took the connection and did not answer in time
        start = self._current
        for step in range(len(self._clients)):
            index = (start + step) % len(self._clients)
            try:
                result = op(self._clients[index])
            except etcd.EtcdWatchTimedOut:
                raise
            except etcd.EtcdConnectionFailed as exc:
                reason = _reason(exc)
                hint = self._mismatch(index, reason)
                if hint is not None:
                    mismatched.append(hint)
                failures.append(f"{self.endpoints[index]}: {reason}")
                silent = silent or self._silent(index, reason)
                continue
            self._current = index
            return result
        if len(mismatched) == len(self._clients):
            raise EtcdV2Error("; ".join(mismatched))  # a setting to change, not an outage
        cls = EtcdV2SilentError if silent else EtcdV2UnreachableError
        raise cls("cannot reach etcd: " + "; ".join(failures))

    def _silent(self, index: int, reason: str) -> bool:
        """A read that timed out is a member that took the request and is silent; a connect
        that timed out is one only if it accepts connections (else a dropped route)."""
        low = reason.lower()
        if "read timed out" in low:
            return True
        return "timed out" in low and accepts_connections(self.endpoints[index], min(self.timeout, PROBE_TIMEOUT))

    def _mismatch(self, index: int, reason: str) -> str | None:
        """What to change when endpoint `index` hung up because one side speaks TLS and the
        other does not (asked with one probe, rdzv/etcd/probe.py; the verdict holds a while)."""
        low = reason.lower()
        if not any(word in low for word in (_TLS_HANGUP if self._tls else _PLAIN_HANGUP)):
            return None
        now = time.monotonic()
        held = self._probed.get(index)
        if held is None or now >= held[0]:
            hint = mismatch_hint(self.endpoints[index], self._tls, min(self.timeout, PROBE_TIMEOUT))
            held = self._probed[index] = (now + PROBE_HOLDS, hint)
        return held[1]

    # Thin wrappers (python-etcd's names), each one request with failover.
    def read(self, key: str, **kwargs: Any) -> etcd.EtcdResult:
        return self.call(lambda c: c.read(key, **kwargs))

    def write(self, key: str, value: str | None, **kwargs: Any) -> etcd.EtcdResult:
        return self.call(lambda c: c.write(key, value, **kwargs))

    def delete(self, key: str, **kwargs: Any) -> etcd.EtcdResult:
        return self.call(lambda c: c.delete(key, **kwargs))

    def refresh(self, key: str, ttl: int) -> etcd.EtcdResult:
        # refresh=true: new TTL, same value, watchers not woken (etcd >= 2.3).
        return self.call(lambda c: c.refresh(key, ttl))

    def watch(self, key: str, index: int, timeout: float) -> etcd.EtcdResult:
        """The first event at or after `index` under `key` (recursive), waiting up to `timeout`."""
        return self.call(lambda c: c.watch(key, index=index, timeout=timeout, recursive=True))

    def check(self, path: str) -> None:
        """Fail now, and clearly, when the endpoints are unreachable or serve no v2 API."""
        quick = min(self.timeout, 5.0)
        with v2_errors(self.describe()), contextlib.suppress(etcd.EtcdKeyNotFound):
            self.call(lambda c: c.read(path, timeout=quick))


def _disown(client: EtcdV2Client) -> None:
    """In a fork()ed child: an inherited client's pooled keep-alive connections are sockets the
    parent still uses, and two processes writing requests and reading answers on one connection
    garble both (etcd answers "400 Bad Request", or one reads the other's answer). It refuses
    every request, and ``close()`` leaves its sockets alone."""
    client._forked = True


# fork() copies the clients and their open sockets: a child starts with none.
_clients: SharedClients[EtcdV2Client] = SharedClients(_disown)


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc.__cause__ or exc
    reason = getattr(cause, "reason", None)  # urllib3's MaxRetryError wraps the socket error
    return str(reason or cause)


def explain(where: str, exc: Exception) -> RendezvousConnectionError:
    """torch's rendezvous error for an etcd v2 failure, naming the endpoints and what to do."""
    if isinstance(exc, etcd.EtcdInsufficientPermissions):
        detail = (f"authentication/authorization failed: {exc} (user and password: user= in "
                  "--rdzv-conf, password in RDZV_ETCD_PASSWORD or password_file=)")
    elif no_v2_api(exc):
        detail = ("the server has no v2 API (HTTP 404 on /v2/keys). Start etcd with --enable-v2 "
                  "(etcd 3.4/3.5; the v2 API is gone in 3.6), or use --rdzv-backend=etcd, which "
                  "speaks the v3 API.")
    elif isinstance(exc, EtcdV2SilentError):
        return StoreBusyError(f"{where}: {exc}")  # a stalled etcd: worth waiting for
    elif isinstance(exc, EtcdV2UnreachableError):
        return StoreUnreachableError(f"{where}: {exc}")  # worth retrying within deadlines
    elif isinstance(exc, EtcdV2Error):
        detail = str(exc)
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return RendezvousConnectionError(f"{where}: {detail}")


@contextlib.contextmanager
def v2_errors(where: str) -> Iterator[None]:
    """Failures nobody handled leave as `explain`ed rendezvous errors."""
    try:
        yield
    except (EtcdV2Error, etcd.EtcdException) as exc:
        raise explain(where, exc) from exc


