"""Who keeps a run's own records alive: a few nodes, not all of them.

A run's records (etcd v3: the run lease; etcd v2: the state document's TTL) outlive any one
node. Refreshing them from every node costs N refreshes per interval for nothing: the
coordinator of a forming round and the first ranks of the running round keep them, and their
lifetime is several node TTLs, so a keeper's death leaves the survivors time to re-form and a
new keeper to take over, while a crashed job's records still expire within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rdzv.rendezvous.records import HEAD_RANKS, RoundRecord

KEEPER_RANKS = HEAD_RANKS  # ranks of the running round that keep the run's records alive (named in its header)
RUN_TTL_LEASES = 3  # the run's records outlive their last keeper by this many lease TTLs


def keeps_run(sealed: RoundRecord | None, node_id: str | None) -> bool:
    """Whether `node_id` is among the ranks of round `sealed` that keep the run alive."""
    if sealed is None or node_id is None:
        return False
    # From the header: no roster lookup (every node decides this for every sealed round).
    return node_id in sealed.head[:KEEPER_RANKS]


@dataclass
class KeepReasons:
    """Why this node keeps the run's records alive ("coordinator", "member"): it keeps them
    while any reason holds. Not locked: its owner's lock guards it with what depends on it."""

    held: set[str] = field(default_factory=set)

    def hold(self, reason: str, holding: bool) -> None:
        if holding:
            self.held.add(reason)
        else:
            self.held.discard(reason)

    def clear(self) -> None:
        self.held.clear()

    def __bool__(self) -> bool:
        return bool(self.held)
