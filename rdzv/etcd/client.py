"""A thin, thread-safe etcd v3 client over our own generated gRPC stubs.

Design (see docs/etcd-client.md):

* One gRPC channel per endpoint, created lazily and kept for the client's lifetime; calls go
  to the *current* endpoint and move to the next one on UNAVAILABLE. We do the failover
  ourselves (not gRPC's ``ipv4:`` multi-address targets) so DNS names and TLS work.
* Reads are retried on another endpoint (also after a per-try deadline). Writes are only
  retried when the request provably never reached etcd (connect failure, "no leader"
  rejection) unless the caller passes ``idempotent=True``.
* Every call carries ``hasleader: true`` so a member cut off from the leader rejects it at
  once instead of hanging until the deadline.
* ONE LeaseKeepAlive stream (:class:`~rdzv.etcd.lease.LeaseKeeper`) and ONE Watch stream
  (:class:`~rdzv.etcd.watch.WatchHub`) per client, each with a single reader thread.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc

from rdzv.etcd.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    EtcdLeaseNotFoundError,
    EtcdTLSError,
    EtcdTLSMismatchError,
    cause_of,
    is_connect_failure,
    is_tls_failure,
    never_sent,
    token_expired,
)
from rdzv.etcd.lease import Lease, LeaseKeeper, OnLost
from rdzv.etcd.probe import mismatch_hint
from rdzv.etcd.proto import etcd_min_pb2 as pb
from rdzv.etcd.proto import etcd_min_pb2_grpc as pbg
from rdzv.etcd.watch import KeyValue, Watch, WatchHub

Bytesish = str | bytes

__all__ = [
    "Compare",
    "EtcdClient",
    "KeyValue",
    "Lease",
    "Op",
    "RangeResult",
    "StatusResult",
    "TxnResult",
    "prefix_end",
]


def _b(x: Bytesish) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


def prefix_end(prefix: Bytesish) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's GetPrefixRangeEnd)."""
    p = bytearray(_b(prefix))
    for i in range(len(p) - 1, -1, -1):
        if p[i] < 0xFF:
            p[i] += 1
            return bytes(p[: i + 1])
    # Empty or all-0xff prefix: "\0" means "to the end of the keyspace".
    return b"\0"


def _range_end(key: bytes, range_end: Bytesish | None, prefix: bool) -> bytes:
    if prefix:
        if range_end is not None:
            raise ValueError("give either prefix=True or range_end, not both")
        return prefix_end(key) if key else b"\0"
    return b"" if range_end is None else _b(range_end)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Answer to a range read: ``revision`` is the store revision the read saw."""

    kvs: list[KeyValue]
    count: int
    more: bool
    revision: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``responses`` follow the executed branch: RangeResult for gets, the revision for puts,
    the deleted count for deletes, TxnResult for nested txns."""

    succeeded: bool
    revision: int
    responses: list[RangeResult | int | TxnResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StatusResult:
    """Maintenance.Status of the member at ``endpoint``."""

    endpoint: str
    version: str
    member_id: int
    leader: int
    revision: int
    raft_term: int
    raft_index: int
    db_size: int
    is_learner: bool
    errors: tuple[str, ...]


def _range_result(r: pb.RangeResponse) -> RangeResult:
    return RangeResult([KeyValue.from_pb(kv) for kv in r.kvs], r.count, r.more, r.header.revision)


def _txn_result(r: pb.TxnResponse) -> TxnResult:
    out: list[RangeResult | int | TxnResult] = []
    rev = r.header.revision
    for op in r.responses:
        kind = op.WhichOneof("response")
        if kind == "response_range":
            out.append(_range_result(op.response_range))
        elif kind == "response_put":
            # Nested headers are not always filled in; every op of a txn shares its revision.
            out.append(rev)
        elif kind == "response_delete_range":
            out.append(op.response_delete_range.deleted)
        else:
            out.append(_txn_result(op.response_txn))
    return TxnResult(r.succeeded, rev, out)


# ----------------------------------------------------------------------------------------
# Txn builders
# ----------------------------------------------------------------------------------------


class Compare:
    """A txn guard. Build with ``Compare.version(k) > 0``, ``Compare.create_revision(k) == 0``,
    ``Compare.mod_revision(k) == rev``, ``Compare.value(k) == b"x"``, ``Compare.lease(k) == id``.
    Supported operators: ``==``, ``!=``, ``>``, ``<``."""

    __slots__ = ("pb",)

    def __init__(self, message: pb.Compare) -> None:
        self.pb = message

    @staticmethod
    def version(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.VERSION, "version", _b(key), range_end)

    @staticmethod
    def create_revision(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.CREATE, "create_revision", _b(key), range_end)

    @staticmethod
    def mod_revision(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.MOD, "mod_revision", _b(key), range_end)

    @staticmethod
    def value(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.VALUE, "value", _b(key), range_end)

    @staticmethod
    def lease(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.LEASE, "lease", _b(key), range_end)

    def __repr__(self) -> str:
        c = self.pb
        op = {0: "==", 1: ">", 2: "<", 3: "!="}[c.result]
        field_name = c.WhichOneof("target_union")
        return f"Compare({field_name}({c.key!r}) {op} {getattr(c, field_name or 'version')!r})"


class CompareTarget:
    """Left-hand side of a :class:`Compare`; comparing it with a value yields the Compare."""

    __slots__ = ("_target", "_field", "_key", "_range_end")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, target: int, field_name: str, key: bytes, range_end: Bytesish | None
    ) -> None:
        self._target = target
        self._field = field_name
        self._key = key
        self._range_end = b"" if range_end is None else _b(range_end)

    def _make(self, result: int, other: object) -> Compare:
        if self._field == "value":
            if not isinstance(other, str | bytes):
                raise TypeError("Compare.value(...) compares with str or bytes")
            val: object = _b(other)
        else:
            if not isinstance(other, int) or isinstance(other, bool):
                raise TypeError(f"Compare.{self._field}(...) compares with an int")
            val = other
        c = pb.Compare(result=result, target=self._target, key=self._key, range_end=self._range_end)
        setattr(c, self._field, val)
        return Compare(c)

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(pb.Compare.EQUAL, other)

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(pb.Compare.NOT_EQUAL, other)

    def __gt__(self, other: object) -> Compare:
        return self._make(pb.Compare.GREATER, other)

    def __lt__(self, other: object) -> Compare:
        return self._make(pb.Compare.LESS, other)


_SORT_ORDER = {"none": 0, "ascend": 1, "descend": 2}
_SORT_TARGET = {"key": 0, "version": 1, "create": 2, "mod": 3, "value": 4}


def _enum(value: str | int | None, table: dict[str, int], what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; use one of {sorted(table)}") from None


def _range_request(
    key: Bytesish,
    range_end: Bytesish | None = None,
    *,
    prefix: bool = False,
    revision: int = 0,
    limit: int = 0,
    count_only: bool = False,
    keys_only: bool = False,
    serializable: bool = False,
    sort_order: str | int | None = None,
    sort_target: str | int | None = None,
) -> pb.RangeRequest:
    k = _b(key)
    return pb.RangeRequest(
        key=k,
        range_end=_range_end(k, range_end, prefix),
        limit=limit,
        revision=revision,
        count_only=count_only,
        keys_only=keys_only,
        serializable=serializable,
        sort_order=_enum(sort_order, _SORT_ORDER, "sort_order"),
        sort_target=_enum(sort_target, _SORT_TARGET, "sort_target"),
    )


class Op:
    """A txn operation: ``Op.put(k, v, lease=0)``, ``Op.get(k, prefix=False, ...)``,
    ``Op.delete(k, prefix=False)``, ``Op.txn(compares, success, failure)``."""

    __slots__ = ("pb",)

    def __init__(self, message: pb.RequestOp) -> None:
        self.pb = message

    @staticmethod
    def put(key: Bytesish, value: Bytesish, lease: int = 0) -> Op:
        return Op(
            pb.RequestOp(request_put=pb.PutRequest(key=_b(key), value=_b(value), lease=lease))
        )

    @staticmethod
    def get(
        key: Bytesish,
        range_end: Bytesish | None = None,
        *,
        prefix: bool = False,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
        keys_only: bool = False,
        sort_order: str | int | None = None,
        sort_target: str | int | None = None,
    ) -> Op:
        req = _range_request(
            key,
            range_end,
            prefix=prefix,
            revision=revision,
            limit=limit,
            count_only=count_only,
            keys_only=keys_only,
            sort_order=sort_order,
            sort_target=sort_target,
        )
        return Op(pb.RequestOp(request_range=req))

    @staticmethod
    def delete(key: Bytesish, range_end: Bytesish | None = None, *, prefix: bool = False) -> Op:
        k = _b(key)
        req = pb.DeleteRangeRequest(key=k, range_end=_range_end(k, range_end, prefix))
        return Op(pb.RequestOp(request_delete_range=req))

    @staticmethod
    def txn(
        compares: Iterable[Compare], success: Iterable[Op] = (), failure: Iterable[Op] = ()
    ) -> Op:
        return Op(pb.RequestOp(request_txn=_txn_request(compares, success, failure)))

    def __repr__(self) -> str:
        return f"Op({self.pb.WhichOneof('request')})"


def _txn_request(
    compares: Iterable[Compare], success: Iterable[Op], failure: Iterable[Op]
) -> pb.TxnRequest:
    return pb.TxnRequest(
        compare=[c.pb for c in compares],
        success=[o.pb for o in success],
        failure=[o.pb for o in failure],
    )


# ----------------------------------------------------------------------------------------
# Endpoints and error classification
# ----------------------------------------------------------------------------------------

_ENDPOINT_RE = re.compile(r"^(?:(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://)?(?P<hostport>[^/]+?)/?$")


@dataclass(frozen=True)
class _Spec:
    address: str  # host:port as dialled (and shown in errors)
    secure: bool


def _parse_endpoints(endpoints: Sequence[str] | str, tls: bool | None) -> list[_Spec]:
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    specs: list[_Spec] = []
    for raw in items:
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            m = _ENDPOINT_RE.match(item)
            if not m:
                raise ValueError(
                    f"bad etcd endpoint {item!r}; expected host:port or http(s)://host:port"
                )
            scheme = (m.group("scheme") or "").lower()
            hostport = m.group("hostport")
            if scheme not in ("", "http", "https"):
                raise ValueError(f"bad etcd endpoint {item!r}: scheme must be http or https")
            if not re.search(r":\d+$", hostport):
                hostport += ":2379"
            secure = scheme == "https" or (scheme == "" and bool(tls))
            if scheme == "http" and tls:
                secure = True  # tls=True forces TLS everywhere
            specs.append(_Spec(hostport, secure))
    if not specs:
        raise ValueError("no etcd endpoints given")
    return specs


_AUTH_TEXT = (
    "authentication failed",
    "user name is empty",
    "invalid user id or password",
    "permission denied",
    "user name not found",
    "auth: ",
)


def _map_error(e: grpc.RpcError, where: str) -> EtcdError:
    code = e.code()
    details = e.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    low = details.lower()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and any(t in low for t in _AUTH_TEXT)
    ):
        return EtcdAuthError(f"etcd at {where} refused: {details}", code=name)
    if "lease not found" in low:
        return EtcdLeaseNotFoundError(f"etcd at {where}: {details}", code=name)
    if "compacted" in low:
        return EtcdCompactedError(0, f"etcd at {where}: {details}")
    return EtcdError(f"etcd at {where}: {details} ({name})", code=name)


class _Endpoint:
    """A channel to one endpoint plus its stubs (created once, reused for every call)."""

    def __init__(
        self,
        spec: _Spec,
        creds: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        self.address = spec.address
        if spec.secure:
            if creds is None:
                creds = grpc.ssl_channel_credentials()
            self.channel = grpc.secure_channel(spec.address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(spec.address, options=options)
        self.kv = pbg.KVStub(self.channel)
        self.watch = pbg.WatchStub(self.channel)
        self.lease = pbg.LeaseStub(self.channel)
        self.auth = pbg.AuthStub(self.channel)
        self.maintenance = pbg.MaintenanceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


_BASE_MD: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
# How long a protocol probe's verdict on an endpoint holds (no probe per retry), and its bound.
PROBE_HOLDS = 30.0
PROBE_TIMEOUT = 1.0
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read etcd {what} {path!r}: {e.strerror}") from None


# ----------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------


class EtcdClient:
    """Thread-safe etcd v3 client. See the module docstring for the failover rules.

    ``endpoints``: ``host:port``, ``http://host:port`` or ``https://host:port``, as a list or a
    comma-separated string. TLS is used for ``https://`` endpoints, and for bare ones when
    ``tls=True`` or a ``ca_cert``/``cert`` is given. ``timeout`` is the default per-call
    deadline (seconds); ``connect_timeout`` bounds how long an unreachable endpoint is tried.
    """

    _shared: ClassVar[dict[tuple[Any, ...], EtcdClient]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    # Every live client, so that a fork()ed child can disown them (see _disown_after_fork).
    _live: ClassVar[weakref.WeakSet[EtcdClient]] = weakref.WeakSet()
    # A child's inherited clients, kept referenced: freeing one would run gRPC's channel
    # teardown on sockets that are still the parent's.
    _inherited: ClassVar[list[EtcdClient]] = []

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 3.0,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        tls: bool | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be > 0")
        if (cert is None) != (key is None):
            raise ValueError("give both cert and key (client certificate and its private key)")
        if password is not None and not user:
            raise ValueError("password given without user")
        if tls is None and (ca_cert or cert):
            tls = True
        self._specs = _parse_endpoints(endpoints, tls)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._user = user or None
        self._password = password or ""
        self._tls = any(s.secure for s in self._specs)
        self._creds: grpc.ChannelCredentials | None = None
        if self._tls:
            self._creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert, "CA certificate"),
                private_key=_read(key, "client key"),
                certificate_chain=_read(cert, "client certificate"),
            )
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Bound one connection attempt (TCP + TLS + HTTP/2 settings) by connect_timeout.
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout * 1000)),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # Detect half-dead connections under long-lived streams; etcd allows >= 5 s.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        self._lock = threading.Lock()
        self._eps: list[_Endpoint | None] = [None] * len(self._specs)
        self._cur = 0
        self._md: tuple[tuple[str, str], ...] = _BASE_MD
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self._closed = False
        self._forked = False  # inherited across fork(): unusable here, see _disown_after_fork
        self._shared_key: tuple[Any, ...] | None = None
        self._refs = 0
        # endpoint index -> (verdict valid until, TLS/plain mismatch hint or None)
        self._probed: dict[int, tuple[float, str | None]] = {}
        self._keeper = LeaseKeeper(self)
        self._hub = WatchHub(self)
        EtcdClient._live.add(self)

    # -- sharing -----------------------------------------------------------------------------

    @classmethod
    def shared(cls, endpoints: Sequence[str] | str, **kwargs: Any) -> EtcdClient:
        """A process-wide client per identical configuration, reference-counted.

        Every caller must :meth:`close` its reference; the channels and streams are torn down
        when the last one does. Lets hundreds of handlers in one process share one channel,
        one keep-alive stream and one watch stream.
        """
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        cfg = (tuple(e.strip() for e in items if e.strip()), tuple(sorted(kwargs.items())))
        with cls._shared_lock:
            client = cls._shared.get(cfg)
            if client is None or client._closed:
                client = cls(endpoints, **kwargs)
                client._shared_key = cfg
                cls._shared[cfg] = client
            client._refs += 1
            return client

    @classmethod
    def _disown_after_fork(cls) -> None:
        """In a fork()ed child: forget the parent's clients, so the child opens its own.

        The parent's channels are gRPC state whose threads (ours and gRPC's) do not exist here
        and whose sockets the parent still uses; its locks may have been held at fork time. A
        child that used or even closed them would hang or corrupt the parent's streams, so the
        inherited clients are only marked: every call raises, ``close()`` does nothing.
        """
        cls._shared_lock = threading.Lock()
        cls._shared = {}
        inherited = list(cls._live)
        for client in inherited:
            client._forked = client._closed = True
        cls._inherited.extend(inherited)
        cls._live = weakref.WeakSet()

    def _closed_error(self) -> EtcdError:
        if self._forked:
            return EtcdError(
                "etcd client belongs to the parent process (created before fork()); "
                "create a new client or handler in this process"
            )
        return EtcdError("etcd client is closed")

    @property
    def is_shared(self) -> bool:
        return self._shared_key is not None

    @property
    def refcount(self) -> int:
        """References held on a shared client (0 for a private one)."""
        return self._refs

    def close(self) -> None:
        """Release the client (one reference, for a shared one). Idempotent."""
        if self._forked:
            return  # the parent's channels and threads: not ours to tear down
        if self._shared_key is not None:
            with self._shared_lock:
                if self._refs > 0:
                    self._refs -= 1
                if self._refs > 0:
                    return
                if self._shared.get(self._shared_key) is self:
                    del self._shared[self._shared_key]
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._hub.close()
        self._keeper.close()
        with self._lock:
            eps, self._eps = self._eps, [None] * len(self._specs)
        for ep in eps:
            if ep is not None:
                ep.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the password
        user = f", user={self._user!r}" if self._user else ""
        return f"EtcdClient({self.endpoints}, tls={self._tls}{user})"

    # -- endpoints ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [s.address for s in self._specs]

    @property
    def endpoint(self) -> str:
        """The endpoint calls currently go to."""
        return self._specs[self._cur].address

    def _ep(self, idx: int) -> _Endpoint:
        if self._forked:
            raise self._closed_error()
        ep = self._eps[idx]
        if ep is None:
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                ep = self._eps[idx]
                if ep is None:
                    ep = _Endpoint(self._specs[idx], self._creds, self._options)
                    self._eps[idx] = ep
        return ep

    def _rotate(self, idx: int) -> None:
        # Only the first thread to see endpoint idx fail moves on; others reuse its choice.
        with self._lock:
            if self._cur == idx:
                self._cur = (idx + 1) % len(self._specs)

    # -- auth --------------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._user is not None and self._token is None:
            self._authenticate()
        return self._md

    def _authenticate(self) -> None:
        with self._auth_lock:
            if self._token is not None:
                return
            req = pb.AuthenticateRequest(name=self._user or "", password=self._password)
            resp = self._unary("auth", "Authenticate", req, None, retry=True, auth=False)
            self._token = resp.token
            self._md = (*_BASE_MD, ("token", resp.token))

    def _invalidate_token(self, md: tuple[tuple[str, str], ...] | None = None) -> None:
        with self._auth_lock:
            if md is None or md is self._md:
                self._token = None
                self._md = _BASE_MD

    # -- the call path -----------------------------------------------------------------------

    def _unary(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None,
        *,
        retry: bool,
        auth: bool = True,
    ) -> Any:
        """Invoke ``service.method`` with failover; ``retry`` marks the call safe to repeat."""
        total = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + total
        n = len(self._specs)
        failures: dict[str, str] = {}
        mismatched: dict[str, str] = {}  # endpoint -> what to change (TLS on one side only)
        connect_failed: set[int] = set()
        tls_failed: set[int] = set()
        reauthed = False
        attempts = 0
        backoff = 0.05
        while True:
            if self._closed:
                raise self._closed_error()
            idx = self._cur
            ep = self._ep(idx)
            md = self._metadata() if auth else _BASE_MD
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._gave_up(failures, f"no answer within {total:g}s")
            per_try = remaining
            if retry and n > 1:
                # Leave time to try another member if this one hangs.
                # A member whose leader just died holds the request until the deadline, so
                # never give one member the whole budget.
                per_try = max(remaining / 2, min(remaining, 1.0))
            try:
                return getattr(getattr(ep, service), method)(request, timeout=per_try, metadata=md)
            except grpc.RpcError as e:
                code = e.code()
                details = e.details() or ""
                if code == _UNAVAILABLE:
                    failures[ep.address] = cause_of(details)
                    self._rotate(idx)
                    mismatch = self._protocol_mismatch(idx, details)
                    if mismatch is not None:
                        mismatched[ep.address] = failures[ep.address] = mismatch
                    if is_tls_failure(details) or mismatch is not None:
                        tls_failed.add(idx)
                        if len(tls_failed) == n:
                            if len(mismatched) == n:
                                raise EtcdTLSMismatchError(
                                    "; ".join(mismatched.values()), code="UNAVAILABLE"
                                ) from None
                            raise EtcdTLSError(
                                self._describe(failures), code="UNAVAILABLE"
                            ) from None
                    elif not retry and not never_sent(details):
                        raise EtcdConnectionError(
                            f"etcd at {ep.address} failed mid-request ({failures[ep.address]}); "
                            "the write was not retried and may or may not have been applied"
                        ) from None
                    if is_connect_failure(details):
                        connect_failed.add(idx)
                        if (
                            len(connect_failed | tls_failed) == n
                            and time.monotonic() - start >= self.connect_timeout
                        ):
                            raise self._gave_up(failures) from None
                    attempts += 1
                    if attempts % n == 0:
                        # Every member failed once: pause before the next round.
                        pause = min(backoff, deadline - time.monotonic())
                        if pause > 0:
                            time.sleep(pause)
                        backoff = min(backoff * 2, 0.5)
                    continue
                if code == _DEADLINE:
                    failures[ep.address] = f"no answer within {per_try:.3g}s"
                    if retry and n > 1 and deadline - time.monotonic() > 0.01:
                        self._rotate(idx)
                        continue
                    if not retry:
                        raise EtcdConnectionError(
                            f"etcd at {ep.address} timed out after {per_try:.3g}s; the request "
                            "was not retried and may or may not have been applied"
                        ) from None
                    raise self._gave_up(failures) from None
                if auth and self._user is not None and not reauthed and token_expired(details):
                    reauthed = True
                    self._invalidate_token(md)
                    continue
                if code == grpc.StatusCode.CANCELLED and self._closed:
                    raise EtcdError("etcd client is closed") from None
                raise _map_error(e, ep.address) from None
            except ValueError as e:
                # grpc raises ValueError when the channel was closed under us.
                if self._closed:
                    raise EtcdError("etcd client is closed") from None
                raise EtcdError(f"etcd at {ep.address}: {e}") from None

    def _protocol_mismatch(self, idx: int, details: str) -> str | None:
        """What to change when endpoint `idx` speaks TLS and we do not, or the reverse.

        gRPC words a mismatch like a server hanging up ("Socket closed", "Handshake read
        failed"); a probe of the endpoint (rdzv/etcd/probe.py) settles it, so the user hears
        which side is wrong at once instead of after connect_timeout of retries."""
        spec = self._specs[idx]
        low = details.lower()
        hung_up = "handshake read failed" in low or "wrong version number" in low
        if not (hung_up if spec.secure else "socket closed" in low):
            return None
        now = time.monotonic()
        held = self._probed.get(idx)
        if held is not None and now < held[0]:
            return held[1]
        hint = mismatch_hint(spec.address, spec.secure, min(self.connect_timeout, PROBE_TIMEOUT))
        self._probed[idx] = (now + PROBE_HOLDS, hint)
        return hint

    def _describe(self, failures: dict[str, str]) -> str:
        if len(self._specs) == 1:
            addr = self._specs[0].address
            return f"etcd at {addr} unreachable: {failures.get(addr, 'no answer')}"
        parts = [f"{s.address} ({failures.get(s.address, 'not tried')})" for s in self._specs]
        return "etcd unreachable: " + ", ".join(parts)

    def _gave_up(self, failures: dict[str, str], default: str | None = None) -> EtcdConnectionError:
        if not failures and default:
            failures = {self.endpoint: default}
        return EtcdConnectionError(self._describe(failures), code="UNAVAILABLE")

    # -- stream support (used by LeaseKeeper and WatchHub) -------------------------------------

    def _stream_endpoint(self) -> tuple[int, _Endpoint]:
        idx = self._cur
        return idx, self._ep(idx)

    def _stream_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata()

    def _stream_failed(self, idx: int, err: BaseException | None, what: str) -> None:
        """A keep-alive/watch stream on endpoint ``idx`` broke: re-auth or move on."""
        if isinstance(err, grpc.RpcError):
            code = err.code()
            details = err.details() or ""
            if code == grpc.StatusCode.CANCELLED and self._closed:
                return
            if token_expired(details):
                self._invalidate_token()
                return
        if idx >= 0:
            self._rotate(idx)

    # -- KV ----------------------------------------------------------------------------------

    def range(
        self,
        key: Bytesish,
        range_end: Bytesish | None = None,
        *,
        prefix: bool = False,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
        keys_only: bool = False,
        serializable: bool = False,
        sort_order: str | int | None = None,
        sort_target: str | int | None = None,
        timeout: float | None = None,
    ) -> RangeResult:
        """Read ``[key, range_end)`` (or all keys under ``key`` with ``prefix=True``)."""
        req = _range_request(
            key,
            range_end,
            prefix=prefix,
            revision=revision,
            limit=limit,
            count_only=count_only,
            keys_only=keys_only,
            serializable=serializable,
            sort_order=sort_order,
            sort_target=sort_target,
        )
        return _range_result(self._unary("kv", "Range", req, timeout, retry=True))

    def get(
        self,
        key: Bytesish,
        *,
        revision: int = 0,
        serializable: bool = False,
        timeout: float | None = None,
    ) -> KeyValue | None:
        """The key's current (or ``revision``'s) value, or None if absent."""
        req = pb.RangeRequest(key=_b(key), revision=revision, serializable=serializable)
        resp = self._unary("kv", "Range", req, timeout, retry=True)
        return KeyValue.from_pb(resp.kvs[0]) if resp.kvs else None

    def put(
        self,
        key: Bytesish,
        value: Bytesish,
        *,
        lease: int = 0,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Write ``key``; returns the revision of the write."""
        req = pb.PutRequest(key=_b(key), value=_b(value), lease=lease)
        return int(self._unary("kv", "Put", req, timeout, retry=idempotent).header.revision)

    def delete(
        self,
        key: Bytesish,
        range_end: Bytesish | None = None,
        *,
        prefix: bool = False,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Delete ``key`` (or a range/prefix); returns how many keys were deleted."""
        k = _b(key)
        req = pb.DeleteRangeRequest(key=k, range_end=_range_end(k, range_end, prefix))
        return int(self._unary("kv", "DeleteRange", req, timeout, retry=idempotent).deleted)

    def txn(
        self,
        compares: Iterable[Compare],
        success: Iterable[Op] = (),
        failure: Iterable[Op] = (),
        *,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> TxnResult:
        """If every compare holds run ``success``, else ``failure``; atomically."""
        req = _txn_request(compares, success, failure)
        return _txn_result(self._unary("kv", "Txn", req, timeout, retry=idempotent))

    def compact(
        self, revision: int, *, physical: bool = False, timeout: float | None = None
    ) -> None:
        """Discard history before ``revision``."""
        req = pb.CompactionRequest(revision=revision, physical=physical)
        self._unary("kv", "Compact", req, timeout, retry=False)

    # -- leases ------------------------------------------------------------------------------

    def lease_grant(
        self,
        ttl: float,
        *,
        lease_id: int = 0,
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> Lease:
        """Grant a lease of ``ttl`` seconds (rounded up; etcd may raise it to its minimum)."""
        req = pb.LeaseGrantRequest(TTL=max(1, int(-(-ttl // 1))), ID=lease_id)
        resp = self._unary("lease", "LeaseGrant", req, timeout, retry=idempotent)
        if resp.error:
            raise EtcdError(f"etcd lease grant failed: {resp.error}")
        return Lease(int(resp.ID), int(resp.TTL))

    def lease_revoke(
        self, lease_id: int, *, idempotent: bool = False, timeout: float | None = None
    ) -> None:
        """Revoke the lease, deleting its keys. Raises EtcdLeaseNotFoundError if it is gone.

        Keep-alive registrations are left alone: their ``on_lost`` fires, so other owners of
        the lease (e.g. handlers sharing this client) learn it is gone. Call
        :meth:`stop_keep_alive` first to revoke silently.
        """
        self._unary(
            "lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease_id), timeout, retry=idempotent
        )

    def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Remaining TTL in seconds, or -1 when the lease does not exist (any more)."""
        try:
            resp = self._unary(
                "lease",
                "LeaseTimeToLive",
                pb.LeaseTimeToLiveRequest(ID=lease_id),
                timeout,
                retry=True,
            )
        except EtcdLeaseNotFoundError:
            return -1
        return int(resp.TTL) if resp.TTL > 0 else -1

    def keep_alive(
        self,
        lease_id: int,
        ttl: float | None = None,
        *,
        interval: float | None = None,
        on_lost: OnLost | None = None,
    ) -> int:
        """Keep ``lease_id`` alive on the client's keep-alive stream until stopped.

        Returns a registration id; pass it to :meth:`stop_keep_alive` when several owners keep
        the same lease. ``on_lost(lease_id)`` fires once if the lease expires or is revoked.
        """
        if self._forked:
            raise self._closed_error()
        return self._keeper.register(lease_id, ttl, interval=interval, on_lost=on_lost)

    def stop_keep_alive(self, lease_id: int, registration: int | None = None) -> None:
        """Stop one registration (the given one, else the latest) of :meth:`keep_alive`."""
        if self._forked:
            return  # the parent's keeper: its lock may be held by a thread that is not here
        self._keeper.unregister(lease_id, registration)

    @property
    def lease_keeper(self) -> LeaseKeeper:
        return self._keeper

    # -- watches -----------------------------------------------------------------------------

    def watch(
        self,
        key: Bytesish,
        range_end: Bytesish | None = None,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        filters: Sequence[str | int] = (),
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> Watch:
        """Watch a key, range or prefix from ``start_revision`` (0 = from now).

        Returns once etcd has confirmed the watch, so later writes are never missed. All
        watches of a client share one stream; ``filters`` may contain "noput"/"nodelete".
        """
        if self._forked:
            raise self._closed_error()
        k = _b(key)
        end = _range_end(k, range_end, prefix)
        t = self.timeout if timeout is None else timeout
        if self._user is not None:
            # etcd 3.4 answers a forbidden watch create by closing the whole shared stream,
            # so check read permission (all a watch needs) with a cheap count first.
            probe = pb.RangeRequest(key=k, range_end=end, count_only=True, serializable=True)
            self._unary("kv", "Range", probe, t, retry=True)
        return self._hub.watch(k, end, start_revision, filters, prev_kv, t)

    @property
    def watch_hub(self) -> WatchHub:
        return self._hub

    # -- maintenance -------------------------------------------------------------------------

    def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> StatusResult:
        """Status of the member at ``endpoint`` (default: whichever endpoint answers)."""
        t = self.connect_timeout if timeout is None else timeout
        if endpoint is None:
            resp = self._unary("maintenance", "Status", pb.StatusRequest(), t, retry=True)
            addr = self.endpoint
        else:
            addr = _parse_endpoints([endpoint], self._tls)[0].address
            idx = next((i for i, s in enumerate(self._specs) if s.address == addr), None)
            if idx is None:
                raise ValueError(f"{endpoint!r} is not one of {self.endpoints}")
            try:
                resp = self._ep(idx).maintenance.Status(
                    pb.StatusRequest(), timeout=t, metadata=self._metadata()
                )
            except grpc.RpcError as e:
                if e.code() in (_UNAVAILABLE, _DEADLINE):
                    cls = EtcdTLSError if is_tls_failure(e.details() or "") else EtcdConnectionError
                    raise cls(
                        f"etcd at {addr} unreachable: {cause_of(e.details() or 'timed out')}"
                    ) from None
                raise _map_error(e, addr) from None
        h = resp.header
        return StatusResult(
            endpoint=addr,
            version=resp.version,
            member_id=int(h.member_id),
            leader=int(resp.leader),
            revision=int(h.revision),
            raft_term=int(resp.raftTerm),
            raft_index=int(resp.raftIndex),
            db_size=int(resp.dbSize),
            is_learner=bool(resp.isLearner),
            errors=tuple(resp.errors),
        )

    def check(self, *, timeout: float | None = None) -> StatusResult:
        """Fail fast and clearly if no endpoint answers (or the credentials are refused).

        Raises EtcdConnectionError naming every endpoint tried and why, or EtcdAuthError.
        """
        st = self.status(timeout=timeout)
        if self._user is not None and self._token is None:
            self._authenticate()
        return st


# fork() copies the clients but not the threads serving them: a child starts afresh.
os.register_at_fork(after_in_child=EtcdClient._disown_after_fork)
