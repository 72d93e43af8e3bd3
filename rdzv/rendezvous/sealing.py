"""The record a coordinator seals: who is in the round, their ranks, the master, the restart count."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from rdzv.rendezvous.decoding import MAX_ROUND_RECORD
from rdzv.rendezvous.quarantine import carried_count, charged_host
from rdzv.rendezvous.ranks import RankCandidate, assign_ranks
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundRecord
from rdzv.rendezvous.segments import SegmentCandidate, segment_order


def build_record(
    target: int,
    eligible: Sequence[NodeEntry],
    previous: RoundRecord | None,
    live_prev: Collection[str],
    departed: bool,
    *,
    min_nodes: int,
    max_nodes: int,
    withheld: Sequence[NodeEntry] = (),
    segment_size: int = 0,
) -> RoundRecord:
    """Round `target` of at most `max_nodes` of the `eligible` nodes. `previous`: the round
    before, when sealed last; `live_prev`: its members still present; `departed`: whether one
    of its members is gone (a failure then costs no restart); `withheld`: live nodes kept out
    (quarantined), whose failure reports still count; `segment_size`: rounds of whole
    segments (rdzv.rendezvous.segments; 0: off)."""
    # Previous members first (they keep the job's state warm), then by arrival.
    chosen = sorted(eligible, key=lambda e: (e.info.node_id not in live_prev, e.arrival))
    prev_ranks = {nid: r for r, nid in enumerate(previous.ids)} if previous else {}
    if segment_size:
        ids = segment_order(
            [SegmentCandidate(e.info.node_id, e.info.host, e.info.pid, e.info.segment) for e in chosen],
            segment_size, max_nodes, prev_ranks,
        )
    else:
        ids = assign_ranks(
            (RankCandidate(e.info.node_id, e.info.host, e.info.pid, e.info.rank_hint) for e in chosen[:max_nodes]),
            prev_ranks,
        )
    by_id = {e.info.node_id: e.info for e in chosen}
    master = by_id[ids[0]]
    restarts = previous.restarts if previous else 0
    # One restart for the job when a member's workers failed in the previous round, unless
    # a member of that round is gone: then the failure was the departure's (a collective
    # with a node that left), a membership change that costs no restart.
    charged = None if departed else charged_host(previous, [*eligible, *withheld], live_prev)
    if charged is not None:
        restarts += 1
    blame, strikes = carried_count(previous, charged)
    return RoundRecord.listing(
        ids,
        [by_id[i].host for i in ids],
        identical=identical_workers([by_id[i] for i in ids]),
        round=target,
        master_addr=master.addr,
        master_port=master.port,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        restarts=restarts,
        blame=blame,
        strikes=strikes,
    )


def identical_workers(members: Sequence[NodeInfo]) -> int:
    """Workers per node when every member announced the same number and the same role, else
    0 (not known: some node's launcher did not say, or they differ)."""
    counts = {m.local_world_size for m in members}
    roles = {m.role for m in members}
    (count,) = counts if len(counts) == 1 else (None,)
    return count if count and len(roles) == 1 and None not in roles else 0


def oversize(record: RoundRecord) -> int | None:
    """The encoded size of `record`, listing every member, when it is more than a sealed record
    may have (every reader refuses it, and etcd's default request limit is only half again as
    big), else None. Checked before a backend that stores rosters inline seals: a record
    nobody can read would mark the run corrupt."""
    size = len(record.encode())
    return size if size > MAX_ROUND_RECORD else None
