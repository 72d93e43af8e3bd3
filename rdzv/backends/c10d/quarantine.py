"""The c10d backend's quarantine records: one JSON document (host -> record) in one TCPStore
key, changed by compare-and-set. TCPStore has no TTL: readers drop records past their `until`
(rdzv.rendezvous.quarantine.active), and a put or remove also drops those that have expired, so
the document stays as small as the set of hosts in quarantine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from rdzv.backends.c10d.store import StoreConnection
from rdzv.rendezvous.decoding import RecordError
from rdzv.rendezvous.quarantine import QuarantineRecord

NAME = "quarantine"


class C10dQuarantineBoard:
    """`QuarantineBoard` over a TCPStore (`conn()`: the current connection, `key()`: the
    document's key in the run's current generation)."""

    def __init__(self, conn: Callable[[], StoreConnection], key: Callable[[], str]) -> None:
        self._conn = conn
        self._key = key

    def _load(self) -> tuple[bytes, dict[str, str]]:
        conn, key = self._conn(), self._key()
        raw = conn.get(key) if conn.check([key]) else b""
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}  # garbage is replaced by the next write
        if not isinstance(doc, dict):
            doc = {}
        return raw, {h: v for h, v in doc.items() if isinstance(h, str) and isinstance(v, str)}

    def _change(self, edit: Callable[[dict[str, str]], None]) -> None:
        conn, key = self._conn(), self._key()
        while True:
            raw, doc = self._load()
            edit(doc)
            now = time.time()
            doc = {h: v for h, v in doc.items() if not _expired(v, now)}
            new = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            if conn.compare_set(key, raw, new) == new:
                return

    def put(self, host: str, value: bytes, ttl: float) -> None:
        self._change(lambda doc: doc.__setitem__(host, value.decode()))

    def read(self) -> dict[str, bytes]:
        return {h: v.encode() for h, v in self._load()[1].items()}

    def remove(self, host: str) -> bool:
        found = host in self._load()[1]
        if found:
            self._change(lambda doc: doc.pop(host, None))
        return found


def _expired(value: str, now: float) -> bool:
    try:
        return QuarantineRecord.decode(value).until <= now
    except RecordError:
        return True
