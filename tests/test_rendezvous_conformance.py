"""The behaviour every backend shares, pinned once and run against each backend.

A backend that cannot do something declares it in `Backend.capabilities`; the affected test
then asserts the documented refusal instead of being skipped silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from rdzv_testlib import NodeProcess, new_run_id, node_group, wait_until
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousGracefulExitError,
    RendezvousTimeoutError,
)

from rdzv import create_handler


@dataclass(frozen=True)
class Backend:
    name: str
    endpoint: str
    capabilities: frozenset[str] = field(default_factory=lambda: frozenset({"elastic"}))


@pytest.fixture
def backend(etcd) -> Backend:
    return Backend("etcd", etcd.endpoint)


def ranks_of(infos) -> list[int]:
    return sorted(i.rank for i in infos)


def test_formation_min_equals_max(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g:
        nodes = [g.node(3, 3) for _ in range(3)]
        infos = g.join_all(nodes)
        assert ranks_of(infos) == [0, 1, 2]
        assert {i.world_size for i in infos} == {3}
        boots = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos}
        assert len(boots) == 1, "every node must agree on MASTER_ADDR/PORT"
        assert not any(n.is_closed() for n in nodes)
        assert [n.num_nodes_waiting() for n in nodes] == [0, 0, 0]


def test_elastic_forms_after_last_call(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint, last_call_timeout="1") as g:
        nodes = [g.node(2, 4) for _ in range(2)]
        infos = g.join_all(nodes)
        assert ranks_of(infos) == [0, 1]
        assert {i.world_size for i in infos} == {2}


def test_late_joiner_counted_then_admitted_without_last_call(backend: Backend) -> None:
    # last_call_timeout is huge: re-formation must not wait for it.
    with node_group(backend.name, backend.endpoint, last_call_timeout="1") as g:
        a, b = g.node(2, 3), g.node(2, 3)
        g.join_all([a, b])
        g.conf["last_call_timeout"] = "600"
        late = g.node(2, 3)
        late_future = g.join(late)
        wait_until(lambda: a.num_nodes_waiting() == 1 and b.num_nodes_waiting() == 1, 10,
                   "members to see the late node")
        infos = g.join_all([a, b]) + [late_future.result(timeout=30)]
        assert ranks_of(infos) == [0, 1, 2]
        assert {i.world_size for i in infos} == {3}
        assert a.num_nodes_waiting() == 0


def test_stable_ranks_across_rounds(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g:
        nodes = [g.node(3, 3) for _ in range(3)]
        first = g.join_all(nodes)
        second = g.join_all(nodes)
        assert [i.rank for i in first] == [i.rank for i in second]


def test_new_ranks_follow_natural_host_order(backend: Backend) -> None:
    hosts = ["node66", "node7", "node100", "node8"]
    with node_group(backend.name, backend.endpoint) as g:
        nodes = [g.node(4, 4, local_addr=h) for h in hosts]
        infos = g.join_all(nodes)
        by_host = {h: i.rank for h, i in zip(hosts, infos, strict=True)}
        assert by_host == {"node7": 0, "node8": 1, "node66": 2, "node100": 3}


def test_rank_hint_is_honoured_when_free(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g:
        nodes = [g.node(3, 3, local_addr="a1", rank="2"), g.node(3, 3, local_addr="a2"),
                 g.node(3, 3, local_addr="a3")]
        infos = g.join_all(nodes)
        assert infos[0].rank == 2
        assert ranks_of(infos) == [0, 1, 2]


def test_spare_beyond_max_steps_in_when_a_member_leaves(backend: Backend) -> None:
    run_id = new_run_id("spare")
    procs = [NodeProcess(backend.name, backend.endpoint, run_id, 1, 2) for _ in range(2)]
    try:
        for p in procs:
            p.wait_rounds(1)
        with node_group(backend.name, backend.endpoint, run_id) as g:
            spare = g.node(1, 2)
            fut = g.join(spare)
            time.sleep(1.5)
            assert not fut.done(), "a spare must wait while the group is full"
            procs[0].kill()  # its lease expires; the survivor re-forms and admits the spare
            info = fut.result(timeout=30)
            assert info.world_size == 2
            assert procs[1].wait_rounds(2)["world_size"] == 2
    finally:
        for p in procs:
            p.stop()


def test_member_loss_is_noticed_and_group_reforms(backend: Backend) -> None:
    run_id = new_run_id("loss")
    # A long last call: round 1 waits for all three (max), re-formation must not wait for it.
    victim = NodeProcess(backend.name, backend.endpoint, run_id, 2, 3, last_call_timeout="60")
    try:
        with node_group(backend.name, backend.endpoint, run_id, last_call_timeout="60") as g:
            a, b = g.node(2, 3), g.node(2, 3)
            fa, fb = g.join(a), g.join(b)
            infos = [fa.result(timeout=30), fb.result(timeout=30)]
            assert victim.wait_rounds(1)["world_size"] == 3
            assert {i.world_size for i in infos} == {3}
            killed = time.monotonic()
            victim.kill()
            wait_until(lambda: a.num_nodes_waiting() > 0 and b.num_nodes_waiting() > 0, 15,
                       "survivors to notice the lost member")
            noticed = time.monotonic() - killed
            infos = g.join_all([a, b])
            assert ranks_of(infos) == [0, 1] and {i.world_size for i in infos} == {2}
            print(f"member loss noticed after {noticed:.2f} s (lease_ttl 2 s)")
    finally:
        victim.stop()


def test_closed_run(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g:
        a, b = g.node(2, 2), g.node(2, 2)
        g.join_all([a, b])
        a.set_closed()
        wait_until(b.is_closed, 5, "the other node to see the close")
        with pytest.raises(RendezvousClosedError):
            b.next_rendezvous()
        newcomer = g.node(1, 2)
        with pytest.raises(RendezvousClosedError, match="new --rdzv-id"):
            newcomer.next_rendezvous()


def test_spare_exits_gracefully_when_closed(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g:
        a, b = g.node(1, 1), g.node(1, 1)
        g.join_all([a])
        fut = g.join(b)
        time.sleep(1)
        a.set_closed()
        with pytest.raises(RendezvousGracefulExitError):
            fut.result(timeout=10)


def test_join_timeout_says_how_many_joined(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint, join_timeout="1.5") as g:
        lone = g.node(3, 3)
        start = time.monotonic()
        with pytest.raises(RendezvousTimeoutError, match=r"1 node\(s\) present of min 3"):
            lone.next_rendezvous()
        assert time.monotonic() - start < 10


def test_runs_are_isolated(backend: Backend) -> None:
    with node_group(backend.name, backend.endpoint) as g1, node_group(backend.name, backend.endpoint) as g2:
        nodes1 = [g1.node(2, 2) for _ in range(2)]
        nodes2 = [g2.node(3, 3) for _ in range(3)]
        f1 = [g1.join(n) for n in nodes1]
        f2 = [g2.join(n) for n in nodes2]
        assert {f.result(timeout=30).world_size for f in f1} == {2}
        assert {f.result(timeout=30).world_size for f in f2} == {3}


def test_run_id_reuse_after_clean_end_starts_fresh(backend: Backend) -> None:
    run_id = new_run_id("reuse")
    with node_group(backend.name, backend.endpoint, run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        g.join_all(nodes)
    # node_group shut every node down (which closes the run); the same id starts afresh.
    with node_group(backend.name, backend.endpoint, run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        assert ranks_of(g.join_all(nodes)) == [0, 1]


def test_unreachable_endpoint_fails_fast_naming_it() -> None:
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="127.0.0.1:1"):
        create_handler(_params("etcd", "127.0.0.1:1"))
    assert time.monotonic() - start < 15


def _params(backend: str, endpoint: str):
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(backend, endpoint, new_run_id(), 1, 1, read_timeout="3")
