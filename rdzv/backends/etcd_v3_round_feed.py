"""A member's feed of its round on etcd v3: control changes, and departures of the round's
members from the deletes of their live keys (`EtcdV3Layout.live`), which are bound to each
member's lease. Puts are filtered out by etcd itself: a member receives one small event per
departure, never the other nodes' announcements."""

from __future__ import annotations

import logging
import time

from rdzv.backends.api import NodeChange
from rdzv.backends.etcd_errors import etcd_errors
from rdzv.backends.etcd_roster import EtcdRoster, decode
from rdzv.backends.etcd_v3_feed import RESYNC_EVERY, EtcdChangeFeed
from rdzv.etcd import (
    EtcdAuthError,
    EtcdClient,
    EtcdCompactedError,
    EtcdError,
    Event,
    Watch,
    prefix_end,
)
from rdzv.rendezvous.model import Control

log = logging.getLogger("rdzv")

SLICE = 0.05  # seconds: how a blocking poll alternates between the two watches


class EtcdRoundFeed:
    """`ChangeFeed` of one member: `control` from the run's control keys, node changes only
    for members whose live key was deleted."""

    def __init__(
        self,
        control_feed: EtcdChangeFeed,
        client: EtcdClient,
        live_prefix: str,
        after: int,
        roster: EtcdRoster,
        describe: str,
        run_id: str,
    ) -> None:
        self._control = control_feed
        self._client = client
        self._start = live_prefix.encode()
        self._roster = roster
        self._describe = describe
        self._run_id = run_id
        self._gone: set[str] = set()
        with etcd_errors(describe):
            self._watch = self._open(after)
        self._resynced_at = 0.0

    @property
    def control(self) -> Control:
        return self._control.control

    def _open(self, after: int) -> Watch:
        return self._client.watch(
            self._start, range_end=prefix_end(self._start), start_revision=after + 1,
            filters=("noput",), prev_kv=True,
        )

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            changes = self._control.poll(0)
            departed = self._departures()
            if changes is not None or departed is not None:
                return (changes or []) + (departed or [])
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            with etcd_errors(self._describe):
                events = self._watch.get(SLICE if left is None else min(SLICE, left))
            if events:
                return self._changes(events)

    def _departures(self) -> list[NodeChange] | None:
        with etcd_errors(self._describe):
            try:
                events = self._watch.get(0)
            except EtcdCompactedError:
                return self._resync("departures watch history was compacted")
            except EtcdAuthError:
                raise
            except EtcdError as exc:
                if self._client.closed:
                    raise
                if time.monotonic() - self._resynced_at < RESYNC_EVERY:
                    return None
                return self._resync(f"etcd cancelled the departures watch ({exc})")
        return self._changes(events) if events else None

    def _changes(self, events: list[Event]) -> list[NodeChange]:
        out: list[NodeChange] = []
        for event in events:
            key = event.kv.key.decode(errors="replace")
            node_id = key[len(self._start) :]
            if event.prev_kv is not None:
                assignment = decode(key, event.prev_kv.value)
                if assignment is not None:
                    self._roster.learn({node_id: assignment})
            if node_id not in self._gone:
                self._gone.add(node_id)
                out.append(NodeChange(node_id, None))
        return out

    def _resync(self, why: str) -> list[NodeChange]:
        # Start over from one read: the members listed (rank keys) whose live key is gone.
        start = self._start
        result = self._client.range(start, range_end=prefix_end(start), keys_only=True)
        live = {kv.key.decode(errors="replace")[len(start) :] for kv in result.kvs}
        fresh = self._open(result.revision)
        self._watch.cancel()
        self._watch = fresh
        self._resynced_at = time.monotonic()
        gone = [i for i in self._roster.ids() if i not in live and i not in self._gone]
        self._gone.update(gone)
        log.info("rendezvous %s: %s; resynchronised at revision %d", self._run_id, why, result.revision)
        return [NodeChange(i, None) for i in gone]

    def close(self) -> None:
        self._watch.cancel()
        self._control.close()
