"""Whole-segment rounds and quarantine at the rendezvous level: nodes are
handlers in this process (one a killable process), as in test_rendezvous_conformance.py. On
etcd (v3), etcd-v2 and c10d; static's fixed group has neither (quarantine_after is refused there).

Segments: 8 nodes in segments of 3, 3 and 2 with segment_size=3 form a world of 6 with
contiguous ranks per segment; killing a node of a full segment re-forms with the whole
segments left. Quarantine: a node charged K=2 counted restarts in a row is set aside, a spare
takes its rank; released, it comes back in a later round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from etcd_harness import EtcdServer, free_port
from rdzv_testlib import NodeGroup, NodeProcess, new_run_id
from torch.distributed.elastic.rendezvous import RendezvousHandler
from waiting import wait_until

from rdzv.rendezvous.quarantine import QuarantineRecord, active, charged_host, host_key, host_of
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundRecord
from rdzv.rendezvous.sealing import build_record
from rdzv.rendezvous.segments import SegmentCandidate, room, segment_order, usable

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["etcd", "etcd-v2", "c10d"]


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, etcd_servers: Callable[[str], EtcdServer]) -> tuple[str, str]:
    if request.param.startswith("etcd"):
        return request.param, etcd_servers("3.5").endpoint
    return "c10d", f"127.0.0.1:{free_port()}"  # the first node created serves the store


def _conf(backend: str, **conf: str) -> dict[str, str]:
    # TCPStore resolves each new peer's name; where DNS does not answer that takes 5 s (see
    # test_rendezvous_conformance.py).
    return {**conf, "read_timeout": "15"} if backend == "c10d" else conf


@contextmanager
def _group(backend: str, endpoint: str, **conf: str) -> Iterator[NodeGroup]:
    group = NodeGroup(backend, endpoint, new_run_id("seg"), **_conf(backend, **conf))
    try:
        yield group
    finally:
        group.shutdown()


def _contiguous(ranks: list[int]) -> bool:
    return sorted(ranks) == list(range(min(ranks), min(ranks) + len(ranks)))


def test_whole_segments_form_and_a_lost_node_takes_its_segment_out(where: tuple[str, str]) -> None:
    backend, endpoint = where
    # A long last call: the first round waits for all six of the whole segments (the largest
    # round of whole segments within max 8), whenever the victim's process comes up.
    with _group(backend, endpoint, segment_size="3", last_call_timeout="120", join_timeout="120") as g:
        labels = ["rackA", "rackA", "rackB", "rackB", "rackB", "rackC", "rackC"]
        nodes = [g.node(3, 8, segment=label, local_addr=f"n{i}") for i, label in enumerate(labels)]
        victim = NodeProcess(backend, endpoint, g.run_id, 3, 8, **g.conf, segment="rackA")
        try:
            futures = [g.join(h) for h in nodes]
            first = victim.wait_rounds(1, timeout=120)
            members = {i: f.result(timeout=120) for i, f in enumerate(futures) if labels[i] != "rackC"}
            assert first["world_size"] == 6 and {m.world_size for m in members.values()} == {6}
            ranks_a = [m.rank for i, m in members.items() if labels[i] == "rackA"] + [first["rank"]]
            ranks_b = [m.rank for i, m in members.items() if labels[i] == "rackB"]
            assert _contiguous(ranks_a) and _contiguous(ranks_b), (ranks_a, ranks_b)
            assert sorted(ranks_a + ranks_b) == list(range(6))
            assert not futures[5].done() and not futures[6].done(), "a partial segment waits"

            victim.kill()
            survivors = [nodes[i] for i in members]
            wait_until(lambda: all(h.num_nodes_waiting() > 0 for h in survivors), 30,
                       "the members to notice the lost node")
            again = {i: g.join(nodes[i]) for i in members}
            # rackA has 2 left and rackC 2: only rackB is whole.
            infos = [again[i].result(timeout=60) for i in (2, 3, 4)]
            assert sorted(i.rank for i in infos) == [0, 1, 2] and {i.world_size for i in infos} == {3}
            assert not any(again[i].done() for i in (0, 1)), "a broken segment waits"
        finally:
            victim.stop()


def _fail_and_rejoin(g: NodeGroup, failing: RendezvousHandler, others: list[RendezvousHandler]) -> list:
    """`failing`'s workers fail (a counted restart); everyone rejoins, as torch's agent would."""
    failing.count_failure()
    mine = g.join(failing)
    wait_until(lambda: all(h.num_nodes_waiting() > 0 for h in others), 30, "the others to see it rejoin")
    theirs = [g.join(h) for h in others]
    return [mine, *theirs]


def test_a_node_failing_k_times_is_quarantined_and_released(where: tuple[str, str]) -> None:
    backend, endpoint = where
    with _group(backend, endpoint, quarantine_after="2", quarantine_ttl="300") as g:
        a, bad, c = (g.node(2, 3, local_addr=h) for h in ("hostA", "hostBad", "hostC"))
        spare = g.node(2, 3, local_addr="hostSpare")
        first = g.join_all([a, bad, c])
        rank_of_bad = first[1].rank
        spare_join = g.join(spare)

        futures = _fail_and_rejoin(g, bad, [a, c])
        assert {f.result(timeout=60).world_size for f in futures} == {3}
        assert bad.restarts == 1 and not spare_join.done()

        futures = _fail_and_rejoin(g, bad, [a, c])
        taken = spare_join.result(timeout=60)
        assert taken.rank == rank_of_bad, "the spare takes the quarantined node's rank"
        assert {f.result(timeout=60).world_size for f in futures[1:]} == {3}
        assert not futures[0].done(), "the quarantined node waits"
        board = a.backend.quarantine_board()
        out = active(board)
        assert list(out) == ["hostBad"] and isinstance(out["hostBad"], QuarantineRecord)
        assert "2 counted restarts in a row" in out["hostBad"].reason

        assert board.remove("hostBad")  # what `rdzv quarantine release` does
        # Released, it waits as a spare of the full group; it is back once a member leaves.
        wait_until(lambda: a.num_nodes_waiting() == 0 and a.group_counts().spares == 1, 30,
                   "the released node to wait as a spare")
        spare.withdraw()
        wait_until(lambda: a.num_nodes_waiting() > 0, 30, "the members to see the spare's node leave")
        back = futures[0]
        again = [g.join(a), g.join(c)]
        assert back.result(timeout=60).world_size == 3
        assert {f.result(timeout=60).world_size for f in again} == {3}


def test_a_member_standing_aside_lets_the_others_reform_and_comes_back(where: tuple[str, str]) -> None:
    """What a failed --health-check does after a restart: the member's record goes, the others
    re-form without it; its next join announces it again."""
    backend, endpoint = where
    with _group(backend, endpoint) as g:
        a, b, sick = (g.node(2, 3, local_addr=h) for h in ("hostA", "hostB", "hostSick"))
        g.join_all([a, b, sick])
        sick.stand_aside()
        wait_until(lambda: a.num_nodes_waiting() > 0 and b.num_nodes_waiting() > 0, 30, "the others to see it gone")
        assert {i.world_size for i in g.join_all([a, b])} == {2}
        back = g.join(sick)
        wait_until(lambda: a.num_nodes_waiting() > 0, 30, "the members to see it back")
        assert {f.result(timeout=60).world_size for f in (back, g.join(a), g.join(b))} == {3}


# ---------------------------------------------------------------- the pure parts, without a store

def _entry(node_id: str, host: str, arrival: int, *, failed: int = 0, segment: str | None = None) -> NodeEntry:
    return NodeEntry(NodeInfo(node_id, host, host, 1, 1, 2, failed=failed, segment=segment), arrival)


def test_segment_order_takes_whole_segments_with_contiguous_ranks() -> None:
    labels = {"a1": "A", "b1": "B", "a2": "A", "c1": "C", "b2": "B", "a3": "A", "b3": "B", "c2": "C"}
    cands = [SegmentCandidate(n, f"h-{n}", 1, label) for n, label in labels.items()]
    order = segment_order(cands, 3, 8)
    assert order == ["a1", "a2", "a3", "b1", "b2", "b3"]
    # Previous ranks keep a segment's place and the order within it.
    assert segment_order(cands, 3, 8, {"b2": 0, "b1": 1, "b3": 2}) == ["b2", "b1", "b3", "a1", "a2", "a3"]
    assert segment_order(cands, 3, 5) == ["a1", "a2", "a3"], "no more than max nodes, in whole segments"
    assert usable(labels.values(), 3, 8) == 6 and usable(labels.values(), 3, 5) == 3
    assert room(["C"], 3) == 0 and room(["C", "C", "C", "D"], 3) == 3, "only a whole new segment makes room"


def test_without_labels_segment_size_groups_nodes_in_runs() -> None:
    cands = [SegmentCandidate(f"n{i}", f"node{i}", 1) for i in range(7)]
    assert segment_order(cands, 2, 8) == ["n0", "n1", "n2", "n3", "n4", "n5"]


def test_a_restart_is_charged_to_the_first_reporter_unless_a_member_departed() -> None:
    previous = RoundRecord.listing(("x", "y", "z"), ("hx", "hy", "hz"), round=3, master_addr="h", master_port=1,
                                   min_nodes=2, max_nodes=3, restarts=1, blame="hy", strikes=1)
    nodes = [_entry("x", "hx", 10, failed=3), _entry("y", "hy", 7, failed=3), _entry("z", "hz", 5)]
    record = build_record(4, nodes, previous, {"x", "y", "z"}, False, min_nodes=2, max_nodes=3)
    assert (record.restarts, record.blame, record.strikes) == (2, "hy", 2), "y reported first: its second in a row"
    gone = build_record(4, nodes[:2], previous, {"x", "y"}, True, min_nodes=2, max_nodes=3)
    assert (gone.restarts, gone.blame, gone.strikes) == (1, "hy", 1), "a departure's failure is no one's"
    other = build_record(4, [_entry("x", "hx", 1, failed=3), *nodes[1:]], previous, {"x", "y", "z"}, False,
                         min_nodes=2, max_nodes=3)
    assert (other.blame, other.strikes) == ("hx", 1), "another host starts a new count"
    assert charged_host(None, nodes, {"x"}) is None


def test_records_of_older_versions_still_decode() -> None:
    info = NodeInfo("n1", "h", "a", 1, 2, 3)
    assert b"segment" not in info.encode() and NodeInfo.decode(info.encode()) == info
    labelled = NodeInfo("n1", "h", "a", 1, 2, 3, segment="rack1")
    assert NodeInfo.decode(labelled.encode()).segment == "rack1"
    header = {"round": 2, "master_addr": "a", "master_port": 1, "min_nodes": 1, "max_nodes": 1}
    record = RoundRecord.listing(("n1",), ("h",), **header)
    assert b"strikes" not in record.encode() and RoundRecord.decode(record.encode()) == record
    blamed = RoundRecord.listing(("n1",), ("h",), **header, blame="h", strikes=2)
    assert RoundRecord.decode(blamed.encode()) == blamed
    assert RoundRecord.decode(blamed.encode_header()).strikes == 2, "in the constant-size header too"
    quarantined = QuarantineRecord("h/1", "why", 12.5, 3, 2)
    assert QuarantineRecord.decode(quarantined.encode()) == quarantined
    assert host_of(host_key("h/1")) == "h/1" and host_of("a/b") is None
