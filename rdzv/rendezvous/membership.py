"""A member's view of its round after formation: who left, who asks for a new round, who is new.

Kept up to date from the backend's change feed without requests; the algorithm answers
`num_nodes_waiting()`, `departures()` and `group_counts()` from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rdzv.rendezvous.model import Control, NodeEntry, RoundRecord
from rdzv.rendezvous.segments import room

if TYPE_CHECKING:  # annotations only: the view itself needs no torch
    from rdzv.backends.api import Backend, ChangeFeed


@dataclass
class RoundMembership:
    """What a member knows about its round, maintained from the change feed (no requests):
    members `lost` (record vanished), members `rejoining` (asking for a later round), and
    `newcomers`."""

    record: RoundRecord
    backend: Backend
    watch_nodes: bool
    segment_size: int = 0  # rounds of whole segments (rdzv.rendezvous.segments)
    _feed: ChangeFeed | None = None
    lost: set[str] = field(default_factory=set)
    rejoining: set[str] = field(default_factory=set)
    newcomers: set[str] = field(default_factory=set)
    _labels: dict[str, str | None] = field(default_factory=dict)  # newcomers' segments

    @property
    def feed(self) -> ChangeFeed:
        # Opened on first use, off the formation path: it replays from the seal anyway.
        if self._feed is None:
            self._feed = self.backend.watch(
                self.record.watch_cursor,
                Control(sealed=self.record),
                nodes=self.watch_nodes,
                known=self.record.ids,
            )
        return self._feed

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
        member = self.record.rank_of(node_id) is not None
        if entry is None:
            if member:
                self.lost.add(node_id)
            self.newcomers.discard(node_id)
            self._labels.pop(node_id, None)
            self.rejoining.discard(node_id)
        elif member:
            if entry.info.want > self.record.round:
                self.rejoining.add(node_id)
        else:
            self.newcomers.add(node_id)
            self._labels[node_id] = entry.info.segment

    def _room(self) -> int:
        """Newcomers the round would take: all while not full; with segments, whole ones only."""
        if self.record.full:
            return 0
        if self.segment_size:
            return room(self._labels.values(), self.segment_size)
        return len(self.newcomers)

    def waiting(self) -> int:
        return len(self.lost) + len(self.rejoining) + self._room()

    def counts(self) -> GroupCounts:
        newcomers = len(self.newcomers)
        full = self.record.full
        return GroupCounts(
            waiting=0 if full else newcomers,
            spares=newcomers if full else 0,
            lost=len(self.lost),
            rejoining=len(self.rejoining),
        )

    def departures(self, me: str, session_lost: bool) -> Departures:
        """Members other than `me` lost so far; dropped when `me` is among them or its session
        lapsed (`session_lost`)."""
        gone = tuple(self.record.name_of(n) for n in sorted(self.lost) if n != me)
        return Departures(gone, me in self.lost or session_lost)

    def moved_on(self, me: str) -> bool:
        """Every other member asked for a new round, left, or formed one already."""
        # `lost` and `rejoining` hold members only: count them instead of listing the round.
        moved = len((self.lost | self.rejoining) - {me})
        others = self.record.world_size - (self.record.rank_of(me) is not None)
        return self.feed.control.round > self.record.round or moved >= others


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
