"""The etcd v3 backend's quarantine records: `<run>/quarantine/<host>`, each on a lease of its
own that lasts as long as the quarantine, so a record goes by itself when it ends (and with the
run's keys when the last node leaves). Torch-free: `rdzv quarantine` (rdzv.inspect) uses it too;
the backend passes `errors`, which turns etcd errors into rendezvous errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from rdzv.etcd import EtcdClient, EtcdError
from rdzv.layouts import EtcdV3Layout
from rdzv.rendezvous.quarantine import host_key, host_of


class EtcdV3QuarantineBoard:
    """`QuarantineBoard` over etcd v3."""

    def __init__(
        self,
        client: EtcdClient,
        keys: EtcdV3Layout,
        errors: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        self.client = client
        self.dir = keys.quarantine_dir
        self.errors = errors

    def put(self, host: str, value: bytes, ttl: float) -> None:
        with self.errors():
            lease = self.client.lease_grant(ttl, idempotent=True)
            self.client.put(self.dir + host_key(host), value, lease=lease.id, idempotent=True)

    def read(self) -> dict[str, bytes]:
        with self.errors():
            kvs = self.client.range(self.dir, prefix=True).kvs
        records = {}
        for kv in kvs:
            host = host_of(kv.key.decode(errors="replace")[len(self.dir) :])
            if host is not None:
                records[host] = kv.value
        return records

    def remove(self, host: str) -> bool:
        with self.errors():
            kv = self.client.get(self.dir + host_key(host))
            if kv is None:
                return False
            self.client.delete(self.dir + host_key(host), idempotent=True)
        if kv.lease:
            with contextlib.suppress(EtcdError):  # only tidies: the key is gone already
                self.client.lease_revoke(kv.lease, idempotent=True)
        return True
