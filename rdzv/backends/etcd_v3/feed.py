"""The etcd v3 backend's change feed: one etcd watch, decoded for the algorithm, that starts
over from a fresh read when the history it needs was compacted away or etcd cancelled it for
any other reason (a departure must never go unseen because a watch quietly ended)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from rdzv.backends.api import NodeChange
from rdzv.backends.common.resync import KnownNodes
from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.backends.etcd_v3.restarting_watch import RestartingWatch, StartOver
from rdzv.etcd import EtcdClient, Event, KeyValue, prefix_end
from rdzv.layouts import EtcdV3Layout
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry


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
        self._keys = source.keys
        self.control = control
        end = prefix_end(self._keys.nodes.encode()) if nodes else prefix_end(self._keys.ctl.encode())
        self._range = (self._keys.ctl.encode(), end)
        self._known = KnownNodes(known if nodes else ())
        self._watch = RestartingWatch(source.client, *self._range, after, run_id=run_id, label="watch")

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        with etcd_errors(self._source.describe()):
            events = self._watch.get(timeout)
            if isinstance(events, StartOver):
                return self._resync(events.why)
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
                change = NodeChange(node_id, entry)
                self._known.note(change)
                out.append(change)
            else:
                self._source.apply_control(self.control, key, event.kv, event.type == "DELETE")
        return out

    def _resync(self, why: str) -> list[NodeChange]:
        # Start over from one read of everything this feed covers (one revision, so control
        # and nodes agree) and report the difference.
        control, nodes, revision = self._source.snapshot(*self._range)

        def catch_up() -> list[NodeChange]:
            control.cursor = revision
            self.control.reset_to(control)
            return self._known.resync(nodes)

        return self._watch.restart(revision, why, catch_up)

    def close(self) -> None:
        self._watch.cancel()
