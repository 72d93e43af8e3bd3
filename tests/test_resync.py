"""A feed's start-over (rdzv.backends.common.resync): the diff of a fresh read against what the
consumer holds, and the pacing of start-overs, without a store."""

from __future__ import annotations

import pytest

from rdzv.backends.api import NodeChange
from rdzv.backends.common import resync
from rdzv.backends.common.resync import KnownNodes, ResyncPacing, departed, node_changes
from rdzv.rendezvous.records import NodeEntry, NodeInfo


def _entry(node_id: str, arrival: int = 1) -> NodeEntry:
    return NodeEntry(NodeInfo(node_id, "h-" + node_id, "h-" + node_id, 1, 1, 2), arrival)


def test_departed_keeps_the_order_of_the_known_ids() -> None:
    assert departed(["c", "a", "b", "d"], {"a"}) == ["c", "b", "d"]
    assert departed([], {"a"}) == []
    assert departed(("a", "b"), {"a", "b"}) == []


def test_node_changes_reports_departures_by_id_then_every_fresh_node_in_its_order() -> None:
    fresh = {"z": _entry("z"), "b": _entry("b", 7)}
    assert node_changes({"y", "b", "x"}, fresh) == [
        NodeChange("x", None),
        NodeChange("y", None),
        NodeChange("z", fresh["z"]),
        NodeChange("b", fresh["b"]),
    ]


def test_node_changes_of_nothing_known_and_nothing_fresh() -> None:
    assert node_changes(set(), {}) == []
    assert node_changes({"a"}, {}) == [NodeChange("a", None)]


def test_known_nodes_follow_the_changes_given_and_take_the_fresh_read() -> None:
    known = KnownNodes(["a", "b"])
    known.note(NodeChange("c", _entry("c")))
    known.note(NodeChange("a", None))
    fresh = {"d": _entry("d")}
    assert known.resync(fresh) == [
        NodeChange("b", None), NodeChange("c", None), NodeChange("d", fresh["d"]),
    ]
    # The fresh read is now what the consumer holds: a second start-over reports d alone.
    assert known.resync({}) == [NodeChange("d", None)]


def test_known_nodes_resync_does_not_keep_the_callers_mapping() -> None:
    fresh = {"a": _entry("a")}
    known = KnownNodes()
    known.resync(fresh)
    fresh.clear()
    assert known.resync({}) == [NodeChange("a", None)]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(resync, "time", fake)  # this module's clock only, not other threads'
    return fake


def test_pacing_allows_the_first_start_over_at_once(clock: _Clock) -> None:
    assert not ResyncPacing().too_soon(5.0)
    assert clock.slept == []


def test_pacing_waits_out_the_interval_but_no_longer_than_the_caller_may_block(clock: _Clock) -> None:
    pacing = ResyncPacing()
    pacing.started_over()
    clock.now += 0.25
    assert pacing.too_soon(0.5)
    assert clock.slept == [0.5]
    assert pacing.too_soon(5.0)  # the rest of the interval, not the caller's 5 s
    assert clock.slept == [0.5, pytest.approx(0.25)]
    assert not pacing.too_soon(5.0)


def test_pacing_of_a_poll_that_may_not_block_sleeps_nothing(clock: _Clock) -> None:
    pacing = ResyncPacing()
    pacing.started_over()
    assert pacing.too_soon(0.0)
    assert clock.slept == [0.0]
    clock.now += resync.RESYNC_EVERY
    assert not pacing.too_soon(0.0)
