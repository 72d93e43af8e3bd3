"""Who keeps a run's own records alive: a few nodes, not all of them.

A run's records (etcd v3: the run lease; etcd v2: the state document's TTL) outlive any one
node. Refreshing them from every node costs N refreshes per interval for nothing: the
coordinator of a forming round and the first ranks of the running round keep them, and their
lifetime is several node TTLs, so a keeper's death leaves the survivors time to re-form and a
new keeper to take over, while a crashed job's records still expire within seconds.
"""

from __future__ import annotations

from rdzv.rendezvous.model import RoundRecord

KEEPER_RANKS = 2  # ranks of the running round that keep the run's records alive
RUN_TTL_LEASES = 3  # the run's records outlive their last keeper by this many lease TTLs


def keeps_run(sealed: RoundRecord | None, node_id: str | None) -> bool:
    """Whether `node_id` is among the ranks of round `sealed` that keep the run alive."""
    if sealed is None or node_id is None:
        return False
    rank = sealed.rank_of(node_id)
    return rank is not None and rank < KEEPER_RANKS
