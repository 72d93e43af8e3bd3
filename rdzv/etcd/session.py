"""A lease kept alive for as long as a process participates (like Go's concurrency.Session)."""

from __future__ import annotations

import contextlib
import threading

from rdzv.etcd.client import EtcdClient
from rdzv.etcd.errors import EtcdError


class Session:
    """Grants a lease of ``ttl`` seconds and keeps it alive on the client's keep-alive stream.

    Attach keys with ``client.put(k, v, lease=session.lease_id)``. ``lost`` is set when the
    lease expires or is revoked by someone else; ``close()`` revokes it (idempotent).
    """

    def __init__(
        self,
        client: EtcdClient,
        ttl: float = 10.0,
        *,
        interval: float | None = None,
        lease_id: int = 0,
    ) -> None:
        self.client = client
        # Safe to repeat: a grant whose reply was lost only leaves an unused lease to expire.
        lease = client.lease_grant(ttl, lease_id=lease_id, idempotent=True)
        self.lease_id = lease.id
        self.ttl = lease.ttl
        self.lost = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._registration = client.keep_alive(
            lease.id, lease.ttl, interval=interval, on_lost=self._on_lost
        )

    def _on_lost(self, lease_id: int) -> None:
        self.lost.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, revoke: bool = True) -> None:
        """Stop the keep-alive and revoke the lease (its keys vanish). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.client.stop_keep_alive(self.lease_id, self._registration)
        if revoke and not self.lost.is_set() and not self.client.closed:
            # Best effort: an unreachable etcd lets the lease expire on its own.
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(self.lease_id, idempotent=True)
        self.lost.set()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self.lost.is_set() else "alive"
        return f"Session(lease={self.lease_id:x}, ttl={self.ttl}, {state})"
