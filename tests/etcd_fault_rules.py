"""What the fault proxy (tests/etcd_fault_proxy.py) does to which calls: etcd's own error
statuses, etcd's method names, the rules choosing calls, and the counters it keeps."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

# -- etcd's own error statuses ---------------------------------------------------------------


@dataclass(frozen=True)
class EtcdStatus:
    """A gRPC status as etcd answers it."""

    code: grpc.StatusCode
    details: str


_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# etcd 3.4 and 3.5 map server errors to statuses in etcdserver/api/v3rpc/util.go (togRPCError),
# the statuses being declared in api/v3rpc/rpctypes/error.go. "too many requests" is mapped to
# rpctypes' client-side error value, which carries no gRPC status, so the server sends it as
# UNKNOWN with the text; the RESOURCE_EXHAUSTED status rpctypes declares for it is not sent.
TOO_MANY_REQUESTS = EtcdStatus(grpc.StatusCode.UNKNOWN, "etcdserver: too many requests")
TOO_MANY_REQUESTS_EXHAUSTED = EtcdStatus(_EXHAUSTED, "etcdserver: too many requests")
NO_SPACE = EtcdStatus(_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
NO_LEADER = EtcdStatus(_UNAVAILABLE, "etcdserver: no leader")
LEADER_CHANGED = EtcdStatus(_UNAVAILABLE, "etcdserver: leader changed")
REQUEST_TIMEOUT = EtcdStatus(_UNAVAILABLE, "etcdserver: request timed out")
TIMEOUT_LEADER_FAILED = EtcdStatus(
    _UNAVAILABLE, "etcdserver: request timed out, possibly due to previous leader failure"
)
TIMEOUT_CONNECTION_LOST = EtcdStatus(
    _UNAVAILABLE, "etcdserver: request timed out, possibly due to connection lost"
)
NOT_CAPABLE = EtcdStatus(_UNAVAILABLE, "etcdserver: not capable")
SERVER_STOPPED = EtcdStatus(_UNAVAILABLE, "etcdserver: server stopped")
UNHEALTHY = EtcdStatus(_UNAVAILABLE, "etcdserver: unhealthy cluster")
REQUEST_TOO_LARGE = EtcdStatus(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large")

# -- etcd's methods --------------------------------------------------------------------------

BIDI_METHODS = frozenset({"Watch", "LeaseKeepAlive"})
SERVER_STREAM_METHODS = frozenset({"Snapshot"})
METHODS = (
    BIDI_METHODS
    | SERVER_STREAM_METHODS
    | frozenset(
        {
            *("Range", "Put", "DeleteRange", "Txn", "Compact"),
            *("LeaseGrant", "LeaseRevoke", "LeaseTimeToLive", "LeaseLeases"),
            *("MemberAdd", "MemberRemove", "MemberUpdate", "MemberList", "MemberPromote"),
            *("Alarm", "Status", "Defragment", "Hash", "HashKV", "MoveLeader", "Downgrade"),
            *("AuthEnable", "AuthDisable", "AuthStatus", "Authenticate"),
            *("UserAdd", "UserGet", "UserList", "UserDelete", "UserChangePassword"),
            *("UserGrantRole", "UserRevokeRole", "RoleAdd", "RoleGet", "RoleList", "RoleDelete"),
            *("RoleGrantPermission", "RoleRevokePermission"),
        }
    )
)


def short_name(method: str) -> str:
    """``/etcdserverpb.KV/Txn`` -> ``Txn`` (a short name is returned as it is)."""
    return method.rsplit("/", 1)[-1]


def method_set(methods: Iterable[str] | str | None) -> frozenset[str] | None:
    """Short names of the given methods (one name, or several); ValueError naming any that
    etcd does not have, so that a misspelt rule cannot silently match nothing."""
    if methods is None:
        return None
    names = frozenset(short_name(m) for m in ([methods] if isinstance(methods, str) else methods))
    unknown = sorted(names - METHODS)
    if unknown or not names:
        raise ValueError(f"not etcd v3 methods: {unknown or 'none given'}")
    return names


# -- rules and counters ----------------------------------------------------------------------


@dataclass
class Rule:
    """Which calls a fault hits: of the calls to ``methods`` (None: all), the first
    ``first_n``, or else each with probability ``fraction`` drawn from a ``seed``ed generator.
    ``status`` None means the call is held (a stall) instead of answered."""

    methods: frozenset[str] | None
    status: EtcdStatus | None
    fraction: float = 1.0
    first_n: int | None = None
    seed: int = 0
    matched: int = 0  # calls this rule was asked about
    fired: int = 0  # calls it hit
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must be within [0, 1]")
        if self.first_n is not None and (self.first_n < 0 or self.fraction != 1.0):
            raise ValueError("give first_n (>= 0) or fraction, not both")
        self._rng = random.Random(self.seed)

    def hits(self, method: str) -> bool:
        """Whether this rule takes the call (counted; call under the proxy's lock)."""
        if self.methods is not None and method not in self.methods:
            return False
        self.matched += 1
        if self.first_n is not None:
            hit = self.matched <= self.first_n
        else:
            hit = self._rng.random() < self.fraction
        self.fired += hit
        return hit


@dataclass
class CallStats:
    """Per method: calls (streams: openings) seen, failed by a rule, held by a stall, and
    messages answered to the caller (unary: one per forwarded success)."""

    seen: int = 0
    failed: int = 0
    stalled: int = 0
    responses: int = 0


@dataclass(frozen=True)
class SeenCall:
    """What the last call to a method arrived with: its metadata and deadline (seconds left)."""

    metadata: tuple[tuple[str, str | bytes], ...]
    timeout: float | None
