"""etcd compaction in the middle of a rendezvous, and the cleanup calls that must not raise.

A watch that needs history etcd compacted away is cancelled with a compact revision; the v3
change feed must start over from one fresh read (and report what changed meanwhile, departures
included) instead of failing the node. `retract` (on the way to a timeout error) and `leave`
swallow the failures they are meant to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from etcd_harness import EtcdServer
from rdzv_testlib import NodeGroup, NodeProcess, new_run_id, node_group
from waiting import wait_until

from rdzv.etcd import EtcdClient, EtcdConnectionError, EtcdError

pytestmark = pytest.mark.timeout(120)


def _compact(endpoint: str) -> int:
    """Write a little (so there is history after every watch's start) and compact it all."""
    with EtcdClient(endpoint) as client:
        for i in range(3):
            client.put("/compaction-noise", str(i))
        revision = client.range("/compaction-noise").revision
        client.compact(revision)
        return revision


def _node_keys(endpoint: str, run_id: str) -> list[str]:
    with EtcdClient(endpoint) as client:
        prefix = f"/rdzv/{run_id}/node/"
        return [kv.key.decode() for kv in client.range(prefix, prefix=True, keys_only=True).kvs]


def _resynced(caplog: pytest.LogCaptureFixture, why: str = "history was compacted") -> bool:
    return any(why in r.getMessage() and "; resynchronised" in r.getMessage() for r in caplog.records)


def test_coordinator_waiting_for_nodes_survives_compaction(etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rdzv")
    with node_group("etcd", etcd.endpoint, new_run_id("compact")) as g:
        a = g.node(2, 2)
        backend: Any = a.backend  # type: ignore[attr-defined]
        read_nodes = backend.read_nodes
        compacted = threading.Event()

        def read_then_compact() -> Any:
            # The coordinator watches from its announce, after this read: compact in between,
            # so the watch it opens needs history that is gone.
            result = read_nodes()
            if not compacted.is_set():
                _compact(etcd.endpoint)
                compacted.set()
            return result

        backend.read_nodes = read_then_compact
        first = g.join(a)
        wait_until(compacted.is_set, 30, "the coordinator's snapshot and the compaction")
        wait_until(lambda: _resynced(caplog), 30, "the coordinator's feed to resynchronise")
        assert not first.done(), "the coordinator waits on (it used to fail with a connection error)"
        b = g.node(2, 2)
        infos = [g.join(b).result(timeout=60), first.result(timeout=60)]
        assert sorted(i.rank for i in infos) == [0, 1]


def server_cancel() -> EtcdError:
    """What a server's cancel of a watch becomes (no reason we can provoke on a healthy etcd)."""
    return EtcdError("etcd watch on '/x' cancelled: cancelled by server")


@contextmanager
def _member_and_peer(endpoint: str, run_id: str) -> Iterator[tuple[NodeGroup, Any, NodeProcess]]:
    """A round of two: `a` in this process (a group of 2 to 3), `b` in its own (killable)."""
    with node_group("etcd", endpoint, run_id) as g:
        a = g.node(2, 3)
        future = g.join(a)
        b = NodeProcess("etcd", endpoint, run_id, 2, 3)
        try:
            b.wait_rounds(1)
            future.result(timeout=60)
            yield g, a, b
        finally:
            b.kill()


def test_membership_watch_survives_compaction(etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """A member whose membership watch starts after a compaction (the agent polls it first only
    once workers are up) still sees the member that died meanwhile, and later newcomers."""
    caplog.set_level(logging.INFO, logger="rdzv")
    run_id = new_run_id("compact")
    with _member_and_peer(etcd.endpoint, run_id) as (g, a, b):
        b.kill()  # no goodbye: its record goes when its lease (2 s) expires
        wait_until(lambda: len(_node_keys(etcd.endpoint, run_id)) == 1, 20, "b's record to expire")
        _compact(etcd.endpoint)
        # The watch opens from a compacted revision; etcd cancels it just after creating it.
        wait_until(lambda: a.num_nodes_waiting() == 1, 20, "the lost member, seen after the resync")
        assert _resynced(caplog)
        late = g.node(2, 3)
        late_future = g.join(late)
        wait_until(lambda: a.num_nodes_waiting() == 2, 20, "the newcomer, through the new watch")
        infos = [g.join(a).result(timeout=60), late_future.result(timeout=60)]
        assert sorted(i.rank for i in infos) == [0, 1] and {i.world_size for i in infos} == {2}


def test_membership_watch_cancelled_by_etcd_is_watched_again(etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """etcd may cancel a watch for reasons other than compaction: the feed starts over from a
    fresh read instead of going blind, so a later departure is still seen."""
    caplog.set_level(logging.INFO, logger="rdzv")
    run_id = new_run_id("cancel")
    with _member_and_peer(etcd.endpoint, run_id) as (g, a, b):
        assert a.num_nodes_waiting() == 0
        # What the watch hub does with a server's cancel response (no reason we can provoke
        # on a healthy etcd without compaction): the watch fails with the reason. The feed's
        # watch is a RestartingWatch around the etcd watch.
        feed: Any = a.rendezvous._membership.feed  # type: ignore[attr-defined]
        feed._watch._watch._fail(server_cancel())
        assert a.num_nodes_waiting() == 0  # resynchronised: nothing changed meanwhile
        assert _resynced(caplog, "etcd cancelled the departures watch")
        b.kill()
        wait_until(lambda: a.num_nodes_waiting() == 1, 20, "the lost member, through the new watch")


def test_a_departure_seen_by_a_failed_start_over_is_still_reported(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start-over that finds a member gone but cannot open its new watch must not forget the
    departure: the next start-over reports it (it used to count the member as gone already)."""
    run_id = new_run_id("restart")
    with _member_and_peer(etcd.endpoint, run_id) as (g, a, b):
        assert a.num_nodes_waiting() == 0
        feed: Any = a.rendezvous._membership.feed  # type: ignore[attr-defined]
        client: Any = a.backend.client  # type: ignore[attr-defined]
        # As the watch hub answers a server's cancel: the watch is routed no more events.
        client.watch_hub._drop(feed._watch._watch, server_cancel())
        b.kill()  # unseen: the departures watch has failed
        wait_until(lambda: len(_node_keys(etcd.endpoint, run_id)) == 1, 20, "b's record to expire")
        opened = client.watch
        refusals = []

        def refuse_once(*args: object, **kwargs: object) -> object:
            if not refusals:
                refusals.append(args)
                raise EtcdConnectionError("etcd 127.0.0.1:1: connection refused")
            return opened(*args, **kwargs)

        monkeypatch.setattr(client, "watch", refuse_once)
        assert a.num_nodes_waiting() == 0  # the start-over could not watch again
        assert refusals
        wait_until(lambda: a.num_nodes_waiting() == 1, 20, "the lost member, from the next start-over")


def test_retract_swallows_etcd_failures(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """retract runs on the way to a timeout error: an etcd failure must not replace that error."""
    with node_group("etcd", etcd.endpoint) as g:
        a = g.node(1, 1)
        backend: Any = a.backend  # type: ignore[attr-defined]

        def down(*args: object, **kwargs: object) -> None:
            raise EtcdConnectionError("etcd 127.0.0.1:1: connection refused")

        monkeypatch.setattr(backend.client, "txn", down)
        backend.retract(a.node_id, 1)  # type: ignore[attr-defined]


def test_etcd_v2_leave_when_the_run_is_already_gone(etcd_v2: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """The last node out removes the run's directory; if someone removed it first (another node,
    `rdzv clean`), leaving is still clean: shutdown() says True and warns nothing."""
    with node_group("etcd-v2", etcd_v2.endpoint) as g:
        a = g.node(1, 1)
        g.join_all([a])
        backend: Any = a.backend  # type: ignore[attr-defined]
        close_run = backend.close_run

        def close_then_vanish() -> None:
            close_run()
            backend.client.delete(backend.keys.root, recursive=True, dir=True)

        backend.close_run = close_then_vanish
        assert a.shutdown() is True
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
