"""EtcdClient: the KV, lease, watch and maintenance calls of one etcd cluster, thread-safe.

The client dials through its :class:`~rdzv.etcd.transport.Transport` (failover, auth,
retries) and owns ONE LeaseKeepAlive stream (:class:`~rdzv.etcd.lease.LeaseKeeper`) and ONE
Watch stream (:class:`~rdzv.etcd.watch.WatchHub`). See docs/etcd-client.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rdzv.etcd.errors import EtcdError, EtcdLeaseNotFoundError
from rdzv.etcd.lease import Lease, LeaseKeeper, OnLost
from rdzv.etcd.ops import (
    Bytesish,
    Compare,
    Op,
    delete_request,
    key_range,
    put_request,
    range_request,
    txn_request,
)
from rdzv.etcd.proto import etcd_min_pb2 as pb
from rdzv.etcd.results import KeyValue, RangeResult, StatusResult, TxnResult
from rdzv.etcd.transport import Transport
from rdzv.etcd.watch import Watch, WatchHub
from rdzv.shared_clients import SharedClients

__all__ = ["EtcdClient"]


class EtcdClient:
    """Thread-safe etcd v3 client. See :mod:`rdzv.etcd.transport` for the failover rules.

    ``endpoints``: ``host:port``, ``http://host:port`` or ``https://host:port``, as a list or a
    comma-separated string. TLS is used for ``https://`` endpoints, and for bare ones when
    ``tls=True`` or a ``ca_cert``/``cert`` is given. ``timeout`` is the default per-call
    deadline (seconds); ``connect_timeout`` bounds how long an unreachable endpoint is tried.
    """

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
        self._transport = Transport(
            endpoints,
            timeout=timeout,
            connect_timeout=connect_timeout,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            tls=tls,
            user=user,
            password=password,
        )
        self._keeper = LeaseKeeper(self._transport)
        self._hub = WatchHub(self._transport)
        _clients.track(self)

    # -- sharing and lifetime ----------------------------------------------------------------

    @classmethod
    def shared(cls, endpoints: Sequence[str] | str, **kwargs: Any) -> EtcdClient:
        """A process-wide client per identical configuration, reference-counted.

        Every caller must :meth:`close` its reference; the channels and streams are torn down
        when the last one does. Lets hundreds of handlers in one process share one channel,
        one keep-alive stream and one watch stream.
        """
        items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        cfg = (tuple(e.strip() for e in items if e.strip()), tuple(sorted(kwargs.items())))
        return _clients.acquire(cfg, lambda: cls(endpoints, **kwargs))

    @property
    def refcount(self) -> int:
        """References held on a shared client (0 for a private one)."""
        return _clients.refcount(self)

    def close(self) -> None:
        """Release the client (one reference, for a shared one). Idempotent."""
        if self._transport.forked:
            return  # the parent's channels and threads: not ours to tear down
        if not _clients.release(self) or not self._transport.refuse_calls():
            return
        self._hub.close()
        self._keeper.close()
        self._transport.close()

    @property
    def closed(self) -> bool:
        return self._transport.closed

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the password
        user = f", user={self._transport.user!r}" if self._transport.user else ""
        return f"EtcdClient({self.endpoints}, tls={self._transport.tls}{user})"

    # -- settings ----------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        """The default per-call deadline (seconds)."""
        return self._transport.timeout

    @property
    def connect_timeout(self) -> float:
        return self._transport.connect_timeout

    @property
    def endpoints(self) -> list[str]:
        return self._transport.endpoints

    @property
    def endpoint(self) -> str:
        """The endpoint calls currently go to."""
        return self._transport.endpoint

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
        req = range_request(
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
        return RangeResult.from_pb(self._transport.call("kv", "Range", req, timeout, retry=True))

    def get(
        self,
        key: Bytesish,
        *,
        revision: int = 0,
        serializable: bool = False,
        timeout: float | None = None,
    ) -> KeyValue | None:
        """The key's current (or ``revision``'s) value, or None if absent."""
        req = range_request(key, revision=revision, serializable=serializable)
        resp = self._transport.call("kv", "Range", req, timeout, retry=True)
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
        req = put_request(key, value, lease)
        resp = self._transport.call("kv", "Put", req, timeout, retry=idempotent)
        return int(resp.header.revision)

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
        req = delete_request(key, range_end, prefix)
        resp = self._transport.call("kv", "DeleteRange", req, timeout, retry=idempotent)
        return int(resp.deleted)

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
        req = txn_request(compares, success, failure)
        return TxnResult.from_pb(self._transport.call("kv", "Txn", req, timeout, retry=idempotent))

    def compact(
        self, revision: int, *, physical: bool = False, timeout: float | None = None
    ) -> None:
        """Discard history before ``revision``."""
        req = pb.CompactionRequest(revision=revision, physical=physical)
        self._transport.call("kv", "Compact", req, timeout, retry=False)

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
        resp = self._transport.call("lease", "LeaseGrant", req, timeout, retry=idempotent)
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
        req = pb.LeaseRevokeRequest(ID=lease_id)
        self._transport.call("lease", "LeaseRevoke", req, timeout, retry=idempotent)

    def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Remaining TTL in seconds, or -1 when the lease does not exist (any more)."""
        req = pb.LeaseTimeToLiveRequest(ID=lease_id)
        try:
            resp = self._transport.call("lease", "LeaseTimeToLive", req, timeout, retry=True)
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
        if self._transport.forked:
            raise self._transport.closed_error()
        return self._keeper.register(lease_id, ttl, interval=interval, on_lost=on_lost)

    def stop_keep_alive(self, lease_id: int, registration: int | None = None) -> None:
        """Stop one registration (the given one, else the latest) of :meth:`keep_alive`."""
        if self._transport.forked:
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
        if self._transport.forked:
            raise self._transport.closed_error()
        k, end = key_range(key, range_end, prefix)
        t = self.timeout if timeout is None else timeout
        if self._transport.user is not None:
            # etcd 3.4 answers a forbidden watch create by closing the whole shared stream,
            # so check read permission (all a watch needs) with a cheap count first.
            probe = pb.RangeRequest(key=k, range_end=end, count_only=True, serializable=True)
            self._transport.call("kv", "Range", probe, t, retry=True)
        return self._hub.watch(k, end, start_revision, filters, prev_kv, t)

    @property
    def watch_hub(self) -> WatchHub:
        return self._hub

    # -- maintenance -------------------------------------------------------------------------

    def status(self, endpoint: str | None = None, *, timeout: float | None = None) -> StatusResult:
        """Status of the member at ``endpoint`` (default: whichever endpoint answers)."""
        t = self.connect_timeout if timeout is None else timeout
        req = pb.StatusRequest()
        if endpoint is None:
            resp = self._transport.call("maintenance", "Status", req, t, retry=True)
            addr = self.endpoint
        else:
            addr, resp = self._transport.call_at(endpoint, "maintenance", "Status", req, t)
        return StatusResult.from_pb(addr, resp)

    def check(self, *, timeout: float | None = None) -> StatusResult:
        """Fail fast and clearly if no endpoint answers (or the credentials are refused).

        Raises EtcdConnectionError naming every endpoint tried and why, or EtcdAuthError.
        """
        st = self.status(timeout=timeout)
        self._transport.authenticate()
        return st


def _disown(client: EtcdClient) -> None:
    """In a fork()ed child: the parent's channels are gRPC state whose threads (ours and gRPC's)
    do not exist here and whose sockets the parent still uses, and its locks may have been held
    at fork time. A child that used or even closed them would hang or corrupt the parent's
    streams, so an inherited client is only marked: every call raises, ``close()`` does nothing.
    """
    client._transport.disown()


# fork() copies the clients but not the threads serving them: a child starts afresh.
_clients: SharedClients[EtcdClient] = SharedClients(_disown, reusable=lambda client: not client.closed)
