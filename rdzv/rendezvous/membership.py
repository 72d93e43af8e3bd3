"""A member's view of its round after formation: who left, and how the next round stands.

Kept up to date from the backend's member feed without requests: departures of members come
from the feed (etcd v3: the delete of the member's assignment key), newcomers and members asking
for a new round from the progress the forming round's coordinator publishes. A member never
sees the other nodes' announcements, so a round of N nodes costs each member the same bytes
whatever N is. The algorithm answers `num_nodes_waiting()`, `departures()` and
`group_counts()` from this view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry, RoundProgress, RoundRecord

if TYPE_CHECKING:  # annotations only: the view itself needs no torch
    from rdzv.backends.api import Backend, ChangeFeed


@dataclass
class RoundMembership:
    """What a member knows about its round, maintained from its feed (no requests): members
    `lost` (their liveness ended), and the next round's `progress` as its coordinator
    published it."""

    record: RoundRecord
    backend: Backend
    watch_nodes: bool
    _feed: ChangeFeed | None = None
    lost: set[str] = field(default_factory=set)

    @property
    def feed(self) -> ChangeFeed:
        # Opened on first use, off the formation path: it replays from the seal anyway.
        if self._feed is None:
            if self.watch_nodes:
                self._feed = self.backend.watch_round(self.record)
            else:
                self._feed = self.backend.watch(self.record.watch_cursor, Control(sealed=self.record), nodes=False)
        return self._feed

    @property
    def progress(self) -> RoundProgress:
        """The next round as its coordinator last published it (all zero before it does)."""
        published = self.feed.control.progress.get(self.record.round + 1)
        return published or RoundProgress(joined=0, newcomers=0, rejoining=0, not_back=self.record.world_size)

    def drain(self) -> None:
        while True:
            changes = self.feed.poll(0)
            if changes is None:
                return
            for change in changes:
                self.apply(change.node_id, change.entry)

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()

    def apply(self, node_id: str, entry: NodeEntry | None) -> None:
        # Announcements are the next round's coordinator's to count (`progress`).
        if entry is None and self.record.rank_of(node_id) is not None:
            self.lost.add(node_id)

    def waiting(self) -> int:
        progress = self.progress
        room = 0 if self.record.full else progress.newcomers
        return len(self.lost) + progress.rejoining + room

    def counts(self) -> GroupCounts:
        progress = self.progress
        full = self.record.full
        return GroupCounts(
            waiting=0 if full else progress.newcomers,
            spares=progress.newcomers if full else 0,
            lost=len(self.lost),
            rejoining=progress.rejoining,
        )

    def departures(self, me: str, session_lost: bool) -> Departures:
        """Members other than `me` lost so far; dropped when `me` is among them or its session
        lapsed (`session_lost`)."""
        gone = tuple(self.record.name_of(n) for n in sorted(self.lost) if n != me)
        return Departures(gone, me in self.lost or session_lost)

    def moved_on(self, me: str) -> bool:
        """Every other member asked for a new round, left, or formed one already."""
        control = self.feed.control
        if control.round > self.record.round:
            return True
        others = self.record.world_size - (self.record.rank_of(me) is not None)
        if len(self.lost - {me}) >= others:
            return True
        # The coordinator counts live members still in this round; `me` left (withdrew) already.
        published = control.progress.get(self.record.round + 1)
        return published is not None and published.not_back == 0


@dataclass(frozen=True)
class GroupCounts:
    """Who a member sees around its round (from its feed, no request): `waiting` newcomers the
    group has room for, `spares` beyond a full group, `lost` members whose record vanished,
    `rejoining` members asking for a new round."""

    waiting: int = 0
    spares: int = 0
    lost: int = 0
    rejoining: int = 0


@dataclass(frozen=True)
class Departures:
    """Members of this node's round that left or were lost (by name), and whether this node
    itself was dropped (its liveness lapsed, so the group goes on without it)."""

    nodes: tuple[str, ...] = ()
    dropped: bool = False

    def __bool__(self) -> bool:
        return bool(self.nodes) or self.dropped

    def describe(self) -> str:
        """'node host7 left', 'nodes a, b left', 'this node was dropped from the group'."""
        if self.nodes:
            noun = "node" if len(self.nodes) == 1 else "nodes"
            return f"{noun} {', '.join(self.nodes)} left"
        return "this node was dropped from the group (its lease lapsed)"
