"""The etcd v2 backend's change feed: one long poll per event on a recursive watch of the
control (and node) keys; a feed that fell behind etcd's 1000-event history, or saw a directory
go, re-reads what it covers and replays the difference, deletions included."""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Protocol

import etcd
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import NodeChange
from rdzv.backends.common.pumped_feed import Change
from rdzv.backends.common.resync import KnownNodes
from rdzv.backends.etcd_v2.client import REMOVED, EtcdV2Client, EtcdV2Error, EtcdV2UnreachableError
from rdzv.layouts import EtcdV2Layout
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry, node_entry


class FeedSource(Protocol):
    """What a feed needs of the backend: its client and keys, and how it reads them."""

    client: EtcdV2Client
    keys: EtcdV2Layout

    def describe(self) -> str: ...

    def apply_control(self, control: Control, key: str, value: str | None) -> None: ...

    def read_control(self) -> tuple[Control, int]: ...

    def read_nodes(self) -> tuple[dict[str, NodeEntry], int]: ...


class EtcdV2Watcher:
    """Fetches one event per long poll (a `PumpedFeed`'s fetch)."""

    def __init__(
        self,
        source: FeedSource,
        after: int,
        *,
        nodes: bool,
        known: Collection[str] = (),
        read_timeout: float,
    ) -> None:
        self.source = source
        self.keys = source.keys
        self.nodes = nodes
        self.path = self.keys.watched if nodes else self.keys.ctl
        self.next = after + 1
        # Node ids held as present (by the consumer, or seen here), to replay deletions on a resync.
        self.known = KnownNodes(known if nodes else ())
        self.read_timeout = read_timeout
        self._failing_since: float | None = None

    def fetch(self, wait: float) -> list[Change] | None:
        try:
            event = self.source.client.watch(self.path, self.next, wait)
        except etcd.EtcdWatchTimedOut:
            return None
        except etcd.EtcdEventIndexCleared:
            return self._resync()
        except (EtcdV2Error, etcd.EtcdException) as exc:
            return self._failed(exc)
        self._failing_since = None
        self.next = event.modifiedIndex + 1
        if event.dir:
            return self._resync()  # a directory went (e.g. `rdzv clean`): look at what is left
        value = None if event.action in REMOVED else event.value
        nodes_dir = self.keys.nodes + "/"
        if event.key.startswith(nodes_dir):
            node_id = event.key[len(nodes_dir) :]
            entry = None if value is None else node_entry(event.key, node_id, value, event.createdIndex)
            # A record that does not decode is not a node: as if the key were absent.
            change = NodeChange(node_id, entry)
            self.known.note(change)
            return [change]
        key = event.key
        return [lambda control: self.source.apply_control(control, key, value)]

    def _failed(self, exc: Exception) -> list[Change] | None:
        # An unreachable etcd is waited out for as long as it lasts: a member's feed must
        # still work afterwards, and a join has its own deadline. Anything else (refused
        # credentials, no v2 API) ends the feed after read_timeout.
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        down = now - self._failing_since
        if not isinstance(exc, EtcdV2UnreachableError) and down > self.read_timeout:
            raise RendezvousConnectionError(f"{self.source.describe()}: watch failed: {exc}") from exc
        time.sleep(0.2 if down < 2 else 1.0)
        return None

    def _resync(self) -> list[Change]:
        fresh, index = self.source.read_control()
        changes: list[Change] = [lambda control: control.reset_to(fresh)]
        if self.nodes:
            nodes, _ = self.source.read_nodes()
            changes += self.known.resync(nodes)
        self.next = index + 1  # the node read came later: replaying the gap is harmless
        return changes
