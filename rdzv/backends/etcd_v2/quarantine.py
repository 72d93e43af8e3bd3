"""The etcd v2 backend's quarantine records: `<run>/quarantine/<host>`, each with a TTL as long
as the quarantine, outside the `/w` directory the change feeds watch."""

from __future__ import annotations

import etcd

from rdzv.backends.etcd_v2.client import EtcdV2Client, v2_errors, whole_seconds
from rdzv.layouts import EtcdV2Layout
from rdzv.rendezvous.quarantine import host_key, host_of


class EtcdV2QuarantineBoard:
    """`QuarantineBoard` over etcd v2."""

    def __init__(self, client: EtcdV2Client, keys: EtcdV2Layout) -> None:
        self.client = client
        self.dir = keys.quarantine_dir

    def put(self, host: str, value: bytes, ttl: float) -> None:
        with v2_errors(self.client.describe()):
            self.client.write(self.dir + host_key(host), value.decode(), ttl=whole_seconds(ttl))

    def read(self) -> dict[str, bytes]:
        with v2_errors(self.client.describe()):
            try:
                result = self.client.read(self.dir, recursive=True)
            except etcd.EtcdKeyNotFound:
                return {}
        records = {}
        for leaf in result.leaves:
            host = None if leaf.dir else host_of(leaf.key.rsplit("/", 1)[-1])
            if host is not None and leaf.value is not None:
                records[host] = leaf.value.encode()
        return records

    def remove(self, host: str) -> bool:
        with v2_errors(self.client.describe()):
            try:
                self.client.delete(self.dir + host_key(host))
            except etcd.EtcdKeyNotFound:
                return False
        return True
