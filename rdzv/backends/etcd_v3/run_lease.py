"""The etcd v3 run lease as one node sees it: its id, and this node's keep-alive of it while
the node is one of the run's few keepers (`rdzv.backends.common.run_keepers`), not on every node.

The run's own keys (`ctl/lease`, `ctl/current`, `ctl/closed`, round stores) live on it.
Nodes that do not keep it learn that it lapsed from the delete of `ctl/lease` (which lives on
it) or from a write refused with "lease not found", and then take the current one or a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from rdzv.backends.common.run_keepers import RUN_TTL_LEASES, KeepReasons
from rdzv.etcd import Compare, EtcdClient, EtcdLeaseNotFoundError, Op
from rdzv.rendezvous.decoding import RecordError, parse_lease_id

T = TypeVar("T")


class RunLease:
    """One run's lease for one node: read or created by `ensure()`, kept alive while `keep()`
    has a reason to."""

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        lease_ttl: float,
        unreadable: Callable[[RecordError], Exception],
    ) -> None:
        self._client = client
        self._key = key  # ctl/lease, naming the lease's id
        self._lease_ttl = lease_ttl
        self._unreadable = unreadable  # the error for a `key` that does not hold a lease id
        self._id: int | None = None
        self._registration: int | None = None  # our keep-alive, while we keep it
        self._lost = threading.Event()
        self._reasons = KeepReasons()
        self._lock = threading.Lock()

    @property
    def id(self) -> int | None:
        """The lease's id, once known (None: not yet read or created)."""
        return self._id

    def adopt(self, lease_id: int) -> None:
        """The run's lease is `lease_id` (read from `ctl/lease`)."""
        with self._lock:
            if lease_id != self._id or self._lost.is_set():
                self._stop_locked()
                self._id = lease_id
                self._lost.clear()
            self._sync_locked()

    def lapsed(self) -> None:
        """The lease is gone (its key was deleted, or etcd refused a write on it)."""
        self._lost.set()

    def keep(self, reason: str, keeping: bool) -> None:
        """Keep the lease alive for `reason`, or no longer for it."""
        with self._lock:
            self._reasons.hold(reason, keeping)
            self._sync_locked()

    def drop(self) -> None:
        """Stop keeping it and forget it (this node leaves)."""
        with self._lock:
            self._reasons.clear()
            self._stop_locked()
            self._id = None

    def ensure(self) -> int:
        """The lease's id: known, read from `ctl/lease`, or granted and published there
        (racing nodes agree on one). Raises client errors."""
        if self._id is not None and not self._lost.is_set():
            return self._id
        kv = self._client.get(self._key)
        if kv is not None:
            try:
                lease_id = parse_lease_id(kv.value)
            except RecordError as exc:
                raise self._unreadable(exc) from None
            self.adopt(lease_id)
            return lease_id
        # Several node TTLs: its few keepers may die, and the survivors re-form and name new
        # keepers well before it lapses; a crashed job's keys still go within seconds.
        lease = self._client.lease_grant(int(self._lease_ttl * RUN_TTL_LEASES), idempotent=True)
        result = self._client.txn(
            [Compare.create_revision(self._key) == 0],
            [Op.put(self._key, str(lease.id), lease=lease.id)],
            [Op.get(self._key)],
        )
        if result.succeeded:
            self.adopt(lease.id)
            return lease.id
        self._client.lease_revoke(lease.id)
        winner = int(result.responses[0].kvs[0].value)
        self.adopt(winner)
        return winner

    def write_on(self, write: Callable[[int], T]) -> T:
        """`write(lease id)`; once more on a fresh lease if that one lapsed unseen."""
        try:
            return write(self.ensure())
        except EtcdLeaseNotFoundError:
            self.lapsed()
            return write(self.ensure())

    def _sync_locked(self) -> None:
        if not self._reasons:
            self._stop_locked()
        elif self._id is not None and self._registration is None:
            self._registration = self._client.keep_alive(
                self._id, interval=self._lease_ttl / 3, on_lost=lambda _lease: self._lost.set()
            )

    def _stop_locked(self) -> None:
        if self._id is not None and self._registration is not None:
            self._client.stop_keep_alive(self._id, self._registration)
        self._registration = None
