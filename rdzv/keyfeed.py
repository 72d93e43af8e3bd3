"""The keys under one etcd prefix as batches of events: a snapshot, then a watch from it.

A watch that cannot go on (its history compacted, or cancelled by etcd) is replaced by a fresh
snapshot, and what differs from the last state delivered comes out as events (synthetic
deletes and puts), so a consumer folding the events always holds the prefix's current state.
Reads only: nothing is written. Torch-free.
"""

from __future__ import annotations

import logging

from rdzv.etcd import EtcdClient, EtcdError, Event, KeyValue, Watch

log = logging.getLogger("rdzv.keyfeed")


class KeyFeed:
    """`start()` returns the snapshot as PUT events (oldest change first); `get()` the next
    batch of events. `events` counts the watch's events, `resyncs` the snapshots re-read."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix.encode()
        self._watch: Watch | None = None
        self._state: dict[bytes, KeyValue] = {}  # what the consumer has been given
        self.revision = 0  # the last revision delivered
        self.events = 0
        self.resyncs = 0

    def start(self) -> list[Event]:
        """Read the prefix and watch it from there; the keys read, as PUT events."""
        return self._sync()

    def resync(self) -> list[Event]:
        """Read the prefix afresh; what changed since the last batch, as events."""
        self.resyncs += 1
        return self._sync()

    def get(self, timeout: float) -> list[Event] | None:
        """The next batch (None after `timeout` s). Compaction or a watch cancelled by etcd
        resyncs; errors of the re-read (etcd unreachable, refused) are raised."""
        if self._watch is None:
            return self.resync()
        try:
            batch = self._watch.get(timeout)
        except EtcdError as exc:
            log.info("watch of %s ended (%s); reading it afresh", self._prefix.decode(), exc)
            return self.resync()
        if not batch:
            return None
        for event in batch:
            if event.type == "PUT":
                self._state[event.kv.key] = event.kv
            else:
                self._state.pop(event.kv.key, None)
        self.events += len(batch)
        self.revision = batch[-1].kv.mod_revision
        return batch

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _sync(self) -> list[Event]:
        self.close()
        result = self._client.range(self._prefix, prefix=True)
        fresh = {kv.key: kv for kv in result.kvs}
        gone = [
            Event("DELETE", KeyValue(key, b"", 0, result.revision, 0, 0), prev)
            for key, prev in self._state.items()
            if key not in fresh
        ]
        changed = [kv for key, kv in fresh.items() if self._state.get(key) != kv]
        changed.sort(key=lambda kv: kv.mod_revision)
        self._state = fresh
        self.revision = result.revision
        self._watch = self._client.watch(
            self._prefix, prefix=True, start_revision=result.revision + 1
        )
        return gone + [Event("PUT", kv) for kv in changed]
