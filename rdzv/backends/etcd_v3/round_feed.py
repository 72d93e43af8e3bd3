"""A member's feed of its round on etcd v3: control changes, and departures of the round's
members from the deletes of their live keys (`EtcdV3Layout.live`), which are bound to each
member's lease. Puts are filtered out by etcd itself: a member receives one small event per
departure, never the other nodes' announcements."""

from __future__ import annotations

import time

from rdzv.backends.api import NodeChange
from rdzv.backends.common.resync import departed
from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.backends.etcd_v3.feed import EtcdChangeFeed
from rdzv.backends.etcd_v3.restarting_watch import RestartingWatch, StartOver
from rdzv.backends.etcd_v3.roster import EtcdRoster, decode
from rdzv.etcd import EtcdClient, Event, prefix_end
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import RoundRecord

SLICE = 0.05  # seconds: how a blocking poll alternates between the two watches


class EtcdRoundFeed:
    """`ChangeFeed` of one member: `control` from the run's control keys, node changes only
    for members whose live key was deleted."""

    def __init__(
        self,
        control_feed: EtcdChangeFeed,
        client: EtcdClient,
        live_prefix: str,
        record: RoundRecord,
        describe: str,
        run_id: str,
    ) -> None:
        if not isinstance(record.roster, EtcdRoster):
            raise TypeError("a round whose members are stored apart")
        self._control = control_feed
        self._client = client
        self._start = live_prefix.encode()
        self._roster: EtcdRoster = record.roster
        # The live keys of this round were written between these revisions (the clearing of
        # earlier attempts and the seal): a delete of any other is not a member's departure.
        self._written = (record.watch_cursor, record.cursor or (1 << 62))
        self._size = record.world_size
        self._describe = describe
        self._gone: set[str] = set()
        with etcd_errors(describe):
            self._watch = RestartingWatch(
                client, self._start, prefix_end(self._start), record.watch_cursor,
                run_id=run_id, label="departures watch", filters=("noput",), prev_kv=True,
            )

    @property
    def control(self) -> Control:
        return self._control.control

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            changes = self._control.poll(0)
            if self.control.closed and not self._watch.cancelled:
                # The job is ending: every member's lease goes as it finishes, and a departure
                # then means nothing; without this each member would be sent every other's.
                self._watch.cancel()
            gone = None if self._watch.cancelled else self._departures()
            if changes is not None or gone is not None:
                return (changes or []) + (gone or [])
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            wait = SLICE if left is None else min(SLICE, left)
            if self._watch.cancelled:
                time.sleep(wait)
                continue
            gone = self._departures(wait)
            if gone is not None:
                return gone

    def _departures(self, wait: float = 0.0) -> list[NodeChange] | None:
        with etcd_errors(self._describe):
            events = self._watch.get(wait)
            if isinstance(events, StartOver):
                return self._resync(events.why)
        return self._changes(events) if events else None

    def _changes(self, events: list[Event]) -> list[NodeChange]:
        out: list[NodeChange] = []
        low, high = self._written
        for event in events:
            key = event.kv.key.decode(errors="replace")
            node_id = key[len(self._start) :]
            prev = event.prev_kv
            # Only a key the seal wrote, holding an assignment, is a member's: anything else
            # deleted under the prefix (written by hand, by another tool) is no departure.
            if prev is None or not low < prev.create_revision <= high or node_id in self._gone:
                continue
            assignment = decode(key, node_id, prev.value)
            if assignment is None:
                continue
            self._roster.learn({node_id: assignment})
            self._gone.add(node_id)
            out.append(NodeChange(node_id, None))
        return out

    def _resync(self, why: str) -> list[NodeChange]:
        # Start over from one read. Counting is enough while every member not yet seen gone
        # is still there (the usual case: the watch was only cancelled, or compacted while
        # nobody left); only then are the members listed, by their rank keys.
        start = self._start
        end = prefix_end(start)
        counted = self._client.range(start, range_end=end, count_only=True)
        revision, gone = counted.revision, []
        if counted.count < self._size - len(self._gone):
            result = self._client.range(start, range_end=end, keys_only=True)
            revision = result.revision
            live = {kv.key.decode(errors="replace")[len(start) :] for kv in result.kvs}
            gone = departed(self._roster.ids(), live | self._gone)

        def catch_up() -> list[NodeChange]:
            # Only once the new watch is open: a start-over that fails there must find these
            # members again next time (counted as gone already, they would never be reported).
            self._gone.update(gone)
            return [NodeChange(i, None) for i in gone]

        return self._watch.restart(revision, why, catch_up)

    def close(self) -> None:
        self._watch.cancel()
        self._control.close()
