"""etcd's v2 HTTP API through python-etcd: a process-shared client with endpoint failover, error
translation, and a `torch.distributed.Store` for one rendezvous round.

The v2 API has no transactions, no leases and no batched reads; what it costs us:

* every write is one HTTP request (and one raft proposal); `multi_set` is N of them;
* blocking reads wait on a recursive `waitIndex` watch of the store's directory: one long poll
  per event, never a polling loop, re-read from scratch when etcd's 1000-event history moved
  past us (`EtcdEventIndexCleared`, the v2 counterpart of compaction);
* `add` is a read plus a compare-and-swap on the key's modifiedIndex, retried on a conflict.

Keys and values are base64url so any torch key (with '/' or spaces) and any bytes fit in a
v2 path and value.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import etcd
import urllib3
from torch.distributed import DistStoreError, Store
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.common import to_bytes
from rdzv.etcd.probe import mismatch_hint
from rdzv.rendezvous.backend import StoreUnreachableError
from rdzv.rendezvous.settings import RendezvousSettings

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


def whole_seconds(seconds: float) -> int:
    """v2 TTLs are whole seconds; never round a TTL down to less than asked."""
    return max(1, math.ceil(seconds))


def key_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def name_of(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


def pack(value: bytes) -> str:
    return base64.b64encode(value).decode()


def unpack(text: str | None) -> bytes:
    return base64.b64decode(text or "")


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

    _shared: ClassVar[dict[tuple[Any, ...], EtcdV2Client]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    _live: ClassVar[weakref.WeakSet[EtcdV2Client]] = weakref.WeakSet()
    # A fork()ed child's inherited clients, kept so that their sockets are never closed here.
    _inherited: ClassVar[list[EtcdV2Client]] = []

    def __init__(self, settings: RendezvousSettings) -> None:
        self.endpoints = settings.endpoints
        self.timeout = settings.read_timeout
        self._tls = settings.tls
        self._probed: dict[int, tuple[float, str | None]] = {}  # index -> (valid until, hint)
        cert: str | tuple[str, str] | None = settings.cert
        if settings.cert and settings.key:
            cert = (settings.cert, settings.key)
        self._clients = [
            etcd.Client(
                host=host,
                port=port,
                protocol="https" if settings.tls else "http",
                read_timeout=settings.read_timeout,
                cert=cert,
                ca_cert=settings.cacert,
                username=settings.user,
                password=settings.password,
                per_host_pool_size=POOL_SIZE,
            )
            for host, port in map(_host_port, settings.endpoints)
        ]
        for client in self._clients:
            # Read by urllib3 when it creates a connection pool, i.e. before the first request.
            client.http.connection_pool_kw["retries"] = RETRIES
        self._current = 0
        self._key: tuple[Any, ...] | None = None
        self._refs = 0
        self._forked = False  # inherited across fork(): see _disown_after_fork
        EtcdV2Client._live.add(self)

    @classmethod
    def shared(cls, settings: RendezvousSettings) -> EtcdV2Client:
        key = (settings.endpoints, settings.tls, settings.cacert, settings.cert, settings.key,
               settings.user, settings.password, settings.read_timeout)
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None:
                client = cls._shared[key] = cls(settings)
                client._key = key
            client._refs += 1
            return client

    @classmethod
    def _disown_after_fork(cls) -> None:
        """In a fork()ed child: forget the parent's clients, so the child opens its own.

        Their pooled keep-alive connections are sockets the parent still uses: two processes
        writing requests and reading answers on one connection garble both (etcd answers
        "400 Bad Request", or one reads the other's answer). Inherited clients refuse every
        request and ``close()`` leaves their sockets alone.
        """
        cls._shared_lock = threading.Lock()
        cls._shared = {}
        inherited = list(cls._live)
        for client in inherited:
            client._forked = True
        cls._inherited.extend(inherited)
        cls._live = weakref.WeakSet()

    def close(self) -> None:
        if self._forked:
            return  # the parent's sockets: closing them here is not ours to do
        with self._shared_lock:
            self._refs -= 1
            if self._refs > 0 or self._key is None:
                return
            self._shared.pop(self._key, None)
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
                continue
            self._current = index
            return result
        if len(mismatched) == len(self._clients):
            raise EtcdV2Error("; ".join(mismatched))  # a setting to change, not an outage
        raise EtcdV2UnreachableError("cannot reach etcd: " + "; ".join(failures))

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


# fork() copies the clients and their open sockets: a child starts with none.
os.register_at_fork(after_in_child=EtcdV2Client._disown_after_fork)


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


class EtcdV2Store(Store):
    """A torch Store in one v2 directory. Keys expire `ttl` s after their last write: v2 can
    only expire keys one by one, and refreshing every key of a round would cost a write per key
    per interval, so a crashed job's round store goes away on a fixed clock instead."""

    def __init__(
        self, client: EtcdV2Client, directory: str, *, ttl: float, timeout: float = 300.0
    ) -> None:
        super().__init__()
        self._client = client
        self._dir = directory.rstrip("/")
        self._ttl = whole_seconds(ttl)
        self.set_timeout(timedelta(seconds=timeout))

    def _path(self, name: str) -> str:
        return f"{self._dir}/{key_of(name)}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (EtcdV2Error, etcd.EtcdException) as exc:
            raise DistStoreError(f"etcd v2 store {self._dir}: {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: str | bytes) -> None:
        with self._errors(f"set({key!r})"):
            self._client.write(self._path(key), pack(to_bytes(value)), ttl=self._ttl)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def add(self, key: str, amount: int) -> int:
        path = self._path(key)
        with self._errors(f"add({key!r})"):
            while True:
                try:
                    node = self._client.read(path)
                except etcd.EtcdKeyNotFound:
                    node = None
                total = amount + (int(unpack(node.value)) if node is not None else 0)
                guard: dict[str, Any] = (
                    {"prevIndex": node.modifiedIndex} if node is not None else {"prevExist": False}
                )
                try:
                    self._client.write(path, pack(str(total).encode()), ttl=self._ttl, **guard)
                    return total
                except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                    continue  # somebody else added in between: read again

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        path, want, new = self._path(key), to_bytes(expected), to_bytes(desired)
        guard: dict[str, Any] = {"prevExist": False} if not want else {"prevValue": pack(want)}
        with self._errors(f"compare_set({key!r})"):
            try:
                self._client.write(path, pack(new), ttl=self._ttl, **guard)
                return new
            except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                found = self._snapshot()[0].get(key)
        return want if found is None else found  # torch's answer for a missing key: `expected`

    def delete_key(self, key: str) -> bool:
        with self._errors(f"delete_key({key!r})"):
            try:
                self._client.delete(self._path(key))
                return True
            except etcd.EtcdKeyNotFound:
                return False

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> bytes:
        return self._wait_for([key], self.timeout)[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        found = self._wait_for(keys, self.timeout)
        return [found[k] for k in keys]

    def check(self, keys: list[str]) -> bool:
        with self._errors("check"):
            if len(keys) == 1:
                # The exit barrier polls one key: read just it, not the round's directory.
                try:
                    self._client.read(self._path(keys[0]))
                    return True
                except etcd.EtcdKeyNotFound:
                    return False
            present = self._snapshot()[0]
        return all(k in present for k in keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, timeout if timeout is not None else self.timeout)

    def num_keys(self) -> int:
        with self._errors("num_keys"):
            return len(self._snapshot()[0])

    def _snapshot(self) -> tuple[dict[str, bytes], int]:
        """Every key of the directory (one request) and the etcd index to watch after."""
        try:
            result = self._client.read(self._dir, recursive=True)
        except etcd.EtcdKeyNotFound as exc:
            return {}, index_of(exc)
        values = {
            name_of(n.key.rsplit("/", 1)[1]): unpack(n.value) for n in result.leaves if not n.dir
        }
        return values, result.etcd_index

    def _wait_for(self, keys: list[str], timeout: timedelta) -> dict[str, bytes]:
        limit = timeout.total_seconds()
        deadline = time.monotonic() + limit
        with self._errors("wait"):
            values, index = self._snapshot()
            wanted = {self._path(k): k for k in keys if k not in values}
            while wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = ", ".join(sorted(wanted.values())[:5])
                    raise DistStoreError(
                        f"etcd v2 store {self._dir}: timed out after {limit:g} s waiting for "
                        f"{len(wanted)} key(s): {shown}"
                    )
                try:
                    event = self._client.watch(self._dir, index + 1, min(left, 30.0))
                except etcd.EtcdWatchTimedOut:
                    continue
                except etcd.EtcdEventIndexCleared:
                    values, index = self._snapshot()  # history moved past us: start over
                    wanted = {p: k for p, k in wanted.items() if k not in values}
                    continue
                index = event.modifiedIndex
                name = wanted.get(event.key)
                if name is not None and event.action not in REMOVED:
                    values[name] = unpack(event.value)
                    del wanted[event.key]
        return values
