"""The etcd v3 backend's change feed: one etcd watch, decoded for the algorithm, that starts
over from a fresh read when the history it needs was compacted away or etcd cancelled it for
any other reason (a departure must never go unseen because a watch quietly ended)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Protocol

from rdzv.backends.api import NodeChange
from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.etcd import (
    EtcdAuthError,
    EtcdClient,
    EtcdCompactedError,
    EtcdError,
    Event,
    KeyValue,
    prefix_end,
)
from rdzv.layouts import EtcdV3Layout
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry

log = logging.getLogger("rdzv")

RESYNC_EVERY = 1.0  # seconds: the least time between two start-overs of one feed


class FeedSource(Protocol):
    """What a feed needs of the backend: its client and keys, and how it decodes them."""

    client: EtcdClient
    keys: EtcdV3Layout

    def describe(self) -> str: ...

    def apply_control(self, control: Control, key: str, kv: KeyValue, deleted: bool) -> None: ...

    def node(self, key: str, kv: KeyValue) -> NodeEntry | None: ...

    def snapshot(self, start: bytes, end: bytes) -> tuple[Control, dict[str, NodeEntry], int]: ...


class EtcdChangeFeed:
    """Control and node changes from one etcd watch, decoded for the algorithm."""

    def __init__(
        self,
        source: FeedSource,
        run_id: str,
        after: int,
        control: Control,
        *,
        nodes: bool,
        known: Collection[str] = (),
    ) -> None:
        self._source = source
        self._run_id = run_id
        self._keys = source.keys
        self.control = control
        end = prefix_end(self._keys.nodes.encode()) if nodes else prefix_end(self._keys.ctl.encode())
        self._range = (self._keys.ctl.encode(), end)
        # Node ids the consumer holds as present: a resync reports the ones that are gone.
        self._known: set[str] = set(known) if nodes else set()
        self._watch = source.client.watch(self._range[0], range_end=end, start_revision=after + 1)
        self._resynced_at = 0.0  # monotonic time of the last start-over

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        with etcd_errors(self._source.describe()):
            try:
                events = self._watch.get(timeout)
            except EtcdCompactedError:
                return self._resync("watch history was compacted")
            except EtcdAuthError:
                raise  # refused: watching again would be refused again
            except EtcdError as exc:
                if self._source.client.closed:
                    raise
                # An etcd that keeps cancelling gets one full read per RESYNC_EVERY, not one
                # per poll.
                wait = self._resynced_at + RESYNC_EVERY - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, timeout or 0.0))
                    return None
                return self._resync(f"etcd cancelled the watch ({exc})")
            if events is None:
                return None
            return self._changes(events)

    def _changes(self, events: list[Event]) -> list[NodeChange]:
        out: list[NodeChange] = []
        for event in events:
            self.control.cursor = max(self.control.cursor, event.kv.mod_revision)
            key = event.kv.key.decode(errors="replace")
            if key.startswith(self._keys.nodes):
                node_id = key[len(self._keys.nodes) :]
                entry = None if event.type == "DELETE" else self._source.node(key, event.kv)
                # A record that does not decode is not a node: as if the key were absent.
                out.append(NodeChange(node_id, entry))
                if entry is None:
                    self._known.discard(node_id)
                else:
                    self._known.add(node_id)
            else:
                self._source.apply_control(self.control, key, event.kv, event.type == "DELETE")
        return out

    def _resync(self, why: str) -> list[NodeChange]:
        # The watch cannot go on: start over from one read of everything this feed covers
        # (one revision, so control and nodes agree) and report the difference.
        control, nodes, revision = self._source.snapshot(*self._range)
        # The new watch first: if opening it fails, the old one still reports its error on
        # the next poll (and we try again) instead of this feed going quiet for good.
        fresh = self._source.client.watch(
            self._range[0], range_end=self._range[1], start_revision=revision + 1
        )
        self._watch.cancel()
        self._watch = fresh
        self._resynced_at = time.monotonic()
        control.cursor = revision
        self.control.reset_to(control)
        gone, self._known = self._known - nodes.keys(), set(nodes)
        log.info("rendezvous %s: %s; resynchronised at revision %d", self._run_id, why, revision)
        return [NodeChange(nid, None) for nid in sorted(gone)] + [
            NodeChange(nid, entry) for nid, entry in nodes.items()
        ]

    def close(self) -> None:
        self._watch.cancel()
