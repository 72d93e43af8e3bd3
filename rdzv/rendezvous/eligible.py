"""The coordinator's running count of who may join a forming round, kept per change.

Thousands of announcements arrive in many watch batches; recounting every node on each batch
made coordinating O(N^2). Each change here costs O(1), and the coordinator reads the counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rdzv.rendezvous.records import NodeEntry


@dataclass
class EligibleView:
    """Nodes eligible for round `target` (they asked for it, or were not in the previous
    round), and which members of the previous round (`prev_ids`) are still present."""

    target: int
    prev_ids: set[str]
    # Insertion-ordered: a dict as an ordered set, so the record is built in a stable order.
    eligible: dict[str, None] = field(default_factory=dict)
    live_prev: set[str] = field(default_factory=set)
    _prev_not_ready: set[str] = field(default_factory=set)  # live previous members still in the old round
    # Quarantined hosts (rdzv.rendezvous.quarantine) and their nodes present: never eligible,
    # never waited for, but a live member all the same (a failure is still charged).
    withheld_hosts: set[str] = field(default_factory=set)
    withheld: dict[str, None] = field(default_factory=dict)

    def put(self, node_id: str, entry: NodeEntry) -> None:
        """`node_id` announced (or re-announced) `entry`."""
        member = node_id in self.prev_ids
        if member:
            self.live_prev.add(node_id)
        if entry.info.host in self.withheld_hosts:
            self.withheld[node_id] = None
            self.eligible.pop(node_id, None)
            self._prev_not_ready.discard(node_id)
            return
        if entry.info.want >= self.target or not member:
            self.eligible[node_id] = None
            self._prev_not_ready.discard(node_id)
        else:
            self.eligible.pop(node_id, None)
            self._prev_not_ready.add(node_id)

    def withhold(self, host: str, nodes: Mapping[str, NodeEntry]) -> None:
        """`host` was quarantined: its nodes among `nodes` are withheld from now on."""
        self.withheld_hosts.add(host)
        for node_id, entry in nodes.items():
            if entry.info.host == host:
                self.put(node_id, entry)

    def drop(self, node_id: str) -> None:
        """`node_id`'s record is gone."""
        self.withheld.pop(node_id, None)
        self.eligible.pop(node_id, None)
        self.live_prev.discard(node_id)
        self._prev_not_ready.discard(node_id)

    @property
    def prev_done(self) -> bool:
        """No live member of the previous round still runs it."""
        return not self._prev_not_ready

    @property
    def rejoining(self) -> int:
        """Live members of the previous round that asked for this one (withheld ones aside)."""
        withheld = sum(1 for node_id in self.withheld if node_id in self.prev_ids)  # a few at most
        return len(self.live_prev) - len(self._prev_not_ready) - withheld

    @property
    def not_back(self) -> int:
        """Live members of the previous round still in it."""
        return len(self._prev_not_ready)

    @property
    def departed(self) -> bool:
        """A member of the previous round is gone."""
        return len(self.live_prev) < len(self.prev_ids)
