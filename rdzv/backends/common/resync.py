"""How a change feed starts over after losing its place (history compacted, watch cancelled,
index cleared): the difference between a fresh read and what the consumer was told, as
`NodeChange`s, and the pacing of start-overs. The reading itself is each backend's own.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Container, Iterable, Mapping
from collections.abc import Set as AbstractSet

from rdzv.backends.api import NodeChange
from rdzv.rendezvous.records import NodeEntry

RESYNC_EVERY = 1.0  # seconds: the least time between two start-overs of one feed


def departed(known: Iterable[str], present: Container[str]) -> list[str]:
    """The ids of `known`, in its order, that `present` lacks: those that went unseen."""
    return [node_id for node_id in known if node_id not in present]


def node_changes(known: AbstractSet[str], fresh: Mapping[str, NodeEntry]) -> list[NodeChange]:
    """What a consumer holding `known` as present must be told to hold `fresh`: the departures
    (by id), then every fresh node, as its record may have changed while unseen."""
    gone = [NodeChange(node_id, None) for node_id in departed(sorted(known), fresh)]
    return gone + [NodeChange(node_id, entry) for node_id, entry in fresh.items()]


class KnownNodes:
    """The node ids a feed's consumer holds as present, kept from the changes it is given, so
    that a start-over can report the ones that went meanwhile."""

    def __init__(self, ids: Collection[str] = ()) -> None:
        self._ids: set[str] = set(ids)

    def note(self, change: NodeChange) -> None:
        """`change` is being handed to the consumer."""
        if change.entry is None:
            self._ids.discard(change.node_id)
        else:
            self._ids.add(change.node_id)

    def resync(self, fresh: Mapping[str, NodeEntry]) -> list[NodeChange]:
        """The changes that bring the consumer to `fresh` (`node_changes`); `fresh` is then
        what it holds."""
        changes = node_changes(self._ids, fresh)
        self._ids = set(fresh)
        return changes


class ResyncPacing:
    """At most one start-over per `RESYNC_EVERY` for a feed whose store keeps cancelling its
    watch: one full read a second, not one per poll."""

    def __init__(self) -> None:
        self._at = 0.0  # monotonic time of the last start-over; 0: none yet

    def too_soon(self, wait: float) -> bool:
        """Whether a start-over now would come too soon; if so, first sleep out the rest of
        the interval, but no more than `wait` s (what the caller may block)."""
        left = self._at + RESYNC_EVERY - time.monotonic()
        if left > 0:
            time.sleep(min(left, wait))
            return True
        return False

    def started_over(self) -> None:
        self._at = time.monotonic()
