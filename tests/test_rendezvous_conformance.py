"""The behaviour every backend shares, pinned once and run against each backend:
etcd (v3 API) and etcd-v2 on etcd 3.4 and 3.5, c10d (a TCPStore served by the first node the
test creates) and static.

A backend that cannot do something says so in its `capabilities`; the affected test then
asserts the documented refusal or behaviour instead of being skipped.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from etcd_harness import EtcdServer, free_port
from rdzv_testlib import NodeGroup, NodeProcess, new_run_id
from torch.distributed import DistStoreError
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)
from waiting import wait_until

from rdzv import create_handler
from rdzv.backends.api import DURABLE, ELASTIC, LIVENESS, ROSTER_APART, SPARES
from rdzv.rendezvous.round_store import RoundMemberGoneError
from rdzv.rendezvous.settings import ConfigError

BACKENDS = ["etcd@3.4", "etcd@3.5", "etcd-v2@3.4", "etcd-v2@3.5", "c10d", "static"]


@dataclass
class Backend:
    name: str
    endpoint: str
    capabilities: frozenset[str]
    _ranks: dict[str, Iterator[int]] = field(default_factory=dict)

    @property
    def store_backed(self) -> bool:
        return self.name in ("c10d", "static")

    @property
    def fixed_ranks(self) -> bool:
        """static: node ranks come from --node-rank, not from the rendezvous."""
        return self.name == "static"

    def node_conf(self, run_id: str, max_nodes: int, conf: dict[str, str]) -> dict[str, str]:
        if self.store_backed and "read_timeout" not in conf:
            # TCPStore resolves the peer's name (reverse DNS) for each new connection, in its
            # event loop; where DNS does not answer (this sandbox) the store stalls for the
            # resolver's 5 s timeout, so ops need longer than the suite's 5 s. See docs/backends.md.
            conf = {**conf, "read_timeout": "15"}
        # A static node needs its node rank: hand them out per run, as an operator would.
        if self.fixed_ranks and "rank" not in conf:
            counter = self._ranks.setdefault(run_id, itertools.count())
            conf = {**conf, "rank": str(next(counter) % max_nodes)}
        return conf

    @contextmanager
    def group(self, run_id: str | None = None, **conf: str) -> Iterator[Group]:
        group = Group(self, run_id or new_run_id(), **conf)
        try:
            yield group
        finally:
            group.shutdown()

    def process(self, run_id: str, min_nodes: int, max_nodes: int, **conf: str) -> NodeProcess:
        conf = self.node_conf(run_id, max_nodes, conf)
        return NodeProcess(self.name, self.endpoint, run_id, min_nodes, max_nodes, **conf)


class Group(NodeGroup):
    def __init__(self, backend: Backend, run_id: str, **conf: str) -> None:
        super().__init__(backend.name, backend.endpoint, run_id, **conf)
        self.backend_info = backend

    def node(self, min_nodes: int, max_nodes: int, **extra: str):
        extra = self.backend_info.node_conf(self.run_id, max_nodes, extra)
        return super().node(min_nodes, max_nodes, **extra)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, etcd_servers: Callable[[str], EtcdServer]) -> Backend:
    name, _, version = request.param.partition("@")
    # c10d/static: a fresh port per test; the first node the test creates serves the store.
    endpoint = etcd_servers(version).endpoint if version else f"127.0.0.1:{free_port()}"
    caps = {
        "etcd": frozenset({ELASTIC, SPARES, LIVENESS, DURABLE, ROSTER_APART}),
        "etcd-v2": frozenset({ELASTIC, SPARES, LIVENESS, DURABLE}),
        "c10d": frozenset({ELASTIC, SPARES, LIVENESS}),
        "static": frozenset(),
    }[name]
    return Backend(name, endpoint, caps)


def _join_as_spare(g: Group, node: RendezvousHandler) -> Future[RendezvousInfo]:
    """Start `node`'s join and return once it reports waiting as a spare."""
    roles: list[str] = []
    node.set_progress_callback(lambda progress: roles.append(progress["role"]))
    fut = g.join(node)
    wait_until(lambda: "spare" in roles or fut.done(), 30, "the node to wait as a spare")
    return fut


def ranks_of(infos) -> list[int]:
    return sorted(i.rank for i in infos)


def test_capabilities_are_declared(backend: Backend) -> None:
    with backend.group() as g:
        n = g.node(1, 1)
        assert n.capabilities == backend.capabilities
        assert n.get_backend() == backend.name


def test_formation_min_equals_max(backend: Backend) -> None:
    with backend.group() as g:
        nodes = [g.node(3, 3) for _ in range(3)]
        infos = g.join_all(nodes)
        assert ranks_of(infos) == [0, 1, 2]
        assert {i.world_size for i in infos} == {3}
        boots = {(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port) for i in infos}
        assert len(boots) == 1, "every node must agree on MASTER_ADDR/PORT"
        assert not any(n.is_closed() for n in nodes)
        assert [n.num_nodes_waiting() for n in nodes] == [0, 0, 0]
        infos[0].store.set("k", "v")
        assert infos[2].store.get("k") == b"v", "the round store is shared"


def test_elastic_forms_after_last_call(backend: Backend) -> None:
    with backend.group(last_call_timeout="1") as g:
        if ELASTIC not in backend.capabilities:
            with pytest.raises(ConfigError, match="fixed number of nodes"):
                g.node(2, 4)
            return
        nodes = [g.node(2, 4) for _ in range(2)]
        start = time.monotonic()
        infos = g.join_all(nodes)
        assert time.monotonic() - start >= 0.9, "min < max must wait for the last call"
        assert ranks_of(infos) == [0, 1]
        assert {i.world_size for i in infos} == {2}


def test_late_joiner_counted_then_admitted_without_last_call(backend: Backend) -> None:
    if ELASTIC not in backend.capabilities:
        # A fixed group never grows: members are not told, the late node is refused.
        with backend.group() as g:
            a, b = g.node(2, 2), g.node(2, 2)
            g.join_all([a, b])
            late = g.node(2, 2, rank="1")
            with pytest.raises(RendezvousError, match="no spares"):
                late.next_rendezvous()
            assert a.num_nodes_waiting() == 0 and b.num_nodes_waiting() == 0
        return
    # last_call_timeout is huge: re-formation must not wait for it.
    with backend.group(last_call_timeout="1") as g:
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
    with backend.group() as g:
        nodes = [g.node(3, 3) for _ in range(3)]
        first = g.join_all(nodes)
        second = g.join_all(nodes)
        assert [i.rank for i in first] == [i.rank for i in second]


def test_new_ranks_follow_natural_host_order(backend: Backend) -> None:
    hosts = ["node66", "node7", "node100", "node8"]
    with backend.group() as g:
        if backend.fixed_ranks:
            # static: the node rank is what the node was started with, whatever its host.
            nodes = [g.node(4, 4, local_addr=h, rank=str(r)) for r, h in enumerate(hosts)]
            infos = g.join_all(nodes)
            assert [i.rank for i in infos] == [0, 1, 2, 3]
            return
        nodes = [g.node(4, 4, local_addr=h) for h in hosts]
        infos = g.join_all(nodes)
        by_host = {h: i.rank for h, i in zip(hosts, infos, strict=True)}
        assert by_host == {"node7": 0, "node8": 1, "node66": 2, "node100": 3}


def test_rank_hint_is_honoured_when_free(backend: Backend) -> None:
    with backend.group() as g:
        nodes = [g.node(3, 3, local_addr="a1", rank="2"), g.node(3, 3, local_addr="a2", rank="0"),
                 g.node(3, 3, local_addr="a3", **({"rank": "1"} if backend.fixed_ranks else {}))]
        infos = g.join_all(nodes)
        assert infos[0].rank == 2 and infos[1].rank == 0
        assert ranks_of(infos) == [0, 1, 2]


def test_spare_beyond_max_steps_in_when_a_member_leaves(backend: Backend) -> None:
    run_id = new_run_id("spare")
    if SPARES not in backend.capabilities:
        with backend.group(run_id) as g:
            g.join_all([g.node(2, 2), g.node(2, 2)])
            extra = g.node(2, 2, rank="0")
            start = time.monotonic()
            with pytest.raises(RendezvousError, match=r"full and running without this node"):
                extra.next_rendezvous()
            assert time.monotonic() - start < 10, "refused at once, not after a timeout"
        return
    with backend.group(run_id) as g:
        spare = g.node(1, 2)  # created first: for c10d it serves the store, which must outlive procs[0]
        procs = [backend.process(run_id, 1, 2) for _ in range(2)]
        try:
            for p in procs:
                p.wait_rounds(1)
            fut = _join_as_spare(g, spare)
            assert not fut.done(), "a spare must wait while the group is full"
            procs[0].kill()  # it stops renewing its liveness; the survivor re-forms with the spare
            info = fut.result(timeout=30)
            assert info.world_size == 2
            assert procs[1].wait_rounds(2)["world_size"] == 2
        finally:
            for p in procs:
                p.stop()


def test_member_loss_is_noticed_and_group_reforms(backend: Backend) -> None:
    run_id = new_run_id("loss")
    lo = 3 if ELASTIC not in backend.capabilities else 2
    # A long last call: round 1 waits for all three (max), re-formation must not wait for it.
    with backend.group(run_id, last_call_timeout="60") as g:
        a, b = g.node(lo, 3), g.node(lo, 3)  # before the victim: for c10d/static `a` serves the store
        victim = backend.process(run_id, lo, 3, last_call_timeout="60")
        try:
            fa, fb = g.join(a), g.join(b)
            infos = [fa.result(timeout=30), fb.result(timeout=30)]
            assert victim.wait_rounds(1)["world_size"] == 3
            assert {i.world_size for i in infos} == {3}
            killed = time.monotonic()
            victim.kill()
            if LIVENESS not in backend.capabilities:
                # Documented: without liveness the rendezvous does not notice; the job's
                # workers do (their collectives fail) and the agents restart together.
                time.sleep(2 * 2 + 1)
                assert a.num_nodes_waiting() == 0 and b.num_nodes_waiting() == 0
                return
            wait_until(lambda: a.num_nodes_waiting() > 0 and b.num_nodes_waiting() > 0, 15,
                       "survivors to notice the lost member")
            noticed = time.monotonic() - killed
            infos = g.join_all([a, b])
            assert ranks_of(infos) == [0, 1] and {i.world_size for i in infos} == {2}
            print(f"member loss noticed after {noticed:.2f} s (lease_ttl 2 s)")
        finally:
            victim.stop()


def test_losing_the_first_node(backend: Backend) -> None:
    """DURABLE: the state outlives any node. Without it (c10d, static) the first node serves the
    store, and losing it ends the rendezvous for everyone with an error naming the endpoint."""
    run_id = new_run_id("first")
    elastic = ELASTIC in backend.capabilities
    lo, hi = (1, 2) if elastic else (2, 2)
    first = backend.process(run_id, lo, hi)  # it serves the store (c10d, static)
    try:
        if elastic:
            first.wait_rounds(1)  # formed alone, so it is up (and serving)
        else:
            wait_until(lambda: _listening(backend.endpoint), 60, "node rank 0 to serve the store")
        with backend.group(run_id) as g:
            other = g.node(lo, hi)
            if elastic:
                fut = g.join(other)
                assert first.wait_rounds(2)["world_size"] == 2
                fut.result(timeout=30)
            else:
                g.join_all([other])
            first.kill()
            if DURABLE in backend.capabilities:
                wait_until(lambda: other.num_nodes_waiting() > 0, 15, "the survivor to notice")
                assert g.join_all([other])[0].world_size == 1
                return
            port = backend.endpoint.rsplit(":", 1)[1]
            with pytest.raises(RendezvousConnectionError, match=port) as info:
                other.next_rendezvous()
            assert "lives in" in str(info.value), "the error says why: one node held the store"
    finally:
        first.stop()


def _listening(endpoint: str) -> bool:
    host, port = endpoint.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_closed_run(backend: Backend) -> None:
    with backend.group() as g:
        a, b = g.node(2, 2), g.node(2, 2)
        g.join_all([a, b])
        a.set_closed()
        wait_until(b.is_closed, 5, "the other node to see the close")
        with pytest.raises(RendezvousClosedError):
            b.next_rendezvous()
        newcomer = g.node(1, 2) if ELASTIC in backend.capabilities else g.node(2, 2)
        with pytest.raises(RendezvousClosedError, match="new --rdzv-id"):
            newcomer.next_rendezvous()


def test_spare_exits_gracefully_when_closed(backend: Backend) -> None:
    with backend.group() as g:
        a, b = g.node(1, 1), g.node(1, 1)
        g.join_all([a])
        if SPARES not in backend.capabilities:
            with pytest.raises(RendezvousError, match="no spares"):
                b.next_rendezvous()
            return
        fut = _join_as_spare(g, b)
        a.set_closed()
        with pytest.raises(RendezvousGracefulExitError):
            fut.result(timeout=10)


def test_join_timeout_says_how_many_joined(backend: Backend) -> None:
    with backend.group(join_timeout="1.5") as g:
        lone = g.node(3, 3)
        start = time.monotonic()
        with pytest.raises(RendezvousTimeoutError, match=r"1 node\(s\) present of min 3"):
            lone.next_rendezvous()
        assert time.monotonic() - start < 10


def test_join_timeout_names_members_not_back(backend: Backend) -> None:
    """A member of the previous round that does not come back is named, by host, in the
    waiting node's progress reports and in its join timeout (not just counted)."""
    run_id = new_run_id("notback")
    # join_timeout: long enough for the victim's process to start (import torch) on a busy box.
    with backend.group(run_id, join_timeout="10") as g:
        a = g.node(2, 2)  # first: for c10d/static it serves the store
        victim = backend.process(run_id, 2, 2, local_addr="127.0.0.1")
        try:
            fa = g.join(a)
            assert victim.wait_rounds(1)["world_size"] == 2
            fa.result(timeout=30)
            victim.kill()
            reports: list[dict] = []
            a.set_progress_callback(reports.append)
            with pytest.raises(RendezvousTimeoutError, match=r"round 1's 127\.0\.0\.1 to rejoin"):
                a.next_rendezvous()
            assert any(r.get("missing") == ["127.0.0.1"] for r in reports), reports
        finally:
            victim.stop()


def test_runs_are_isolated(backend: Backend) -> None:
    with backend.group() as g1, backend.group() as g2:
        nodes1 = [g1.node(2, 2) for _ in range(2)]
        nodes2 = [g2.node(3, 3) for _ in range(3)]
        f1 = [g1.join(n) for n in nodes1]
        f2 = [g2.join(n) for n in nodes2]
        assert {f.result(timeout=30).world_size for f in f1} == {2}
        assert {f.result(timeout=30).world_size for f in f2} == {3}


def test_run_id_reuse_after_clean_end_starts_fresh(backend: Backend) -> None:
    run_id = new_run_id("reuse")
    with backend.group(run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        g.join_all(nodes)
    # The group shut every node down (which closes the run); the same id starts afresh.
    with backend.group(run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        assert ranks_of(g.join_all(nodes)) == [0, 1]


def test_unreachable_endpoint_fails_fast_naming_it(backend: Backend) -> None:
    """A refused port is a wrong endpoint, not an etcd in trouble: it is not waited for until
    join_timeout (issue 21), only tried for about read_timeout."""
    conf = {"read_timeout": "3", "join_timeout": "120"}
    if backend.name == "c10d":
        conf["is_host"] = "false"  # 127.0.0.1 is this machine: say that it is not ours to serve
    if backend.fixed_ranks:
        conf["rank"] = "1"  # rank 0 would serve it; rank 1 connects (when it joins)
        # ... and waits for it to come up until join_timeout, as torch's static does.
        conf["join_timeout"] = "3"
    params = RendezvousParameters(backend.name, "127.0.0.1:1", new_run_id(), 2, 2, **conf)
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="127.0.0.1:1") as caught:
        handler = create_handler(params)
        handler.next_rendezvous()
    assert "not answering" not in str(caught.value), caught.value
    assert time.monotonic() - start < 60  # far from join_timeout (120 s)


def test_peer_finishing_cleanly_does_not_restart_the_others(backend: Backend) -> None:
    """torch's launcher shuts a node's handler down when its workers are done (close + leave);
    a peer whose workers are still finishing must not take that as a lost member."""
    with backend.group() as g:
        a, b = g.node(2, 2), g.node(2, 2)  # a first: with c10d it hosts the store
        g.join_all([a, b])
        b.shutdown()
        wait_until(a.is_closed, 10, "the close to reach the other node")
        if LIVENESS in backend.capabilities:
            wait_until(lambda: a.num_nodes_waiting() >= 0 and a.group_counts().lost, 10, "the departure to arrive")
        assert a.num_nodes_waiting() == 0


def test_node_that_never_joined_does_not_close_the_run(backend: Backend) -> None:
    """torch's launcher shuts the handler down whatever the reason it stops; a node that never
    got into a round (join timeout, refused, bad settings) leaves the others' run open."""
    with backend.group() as g:
        a, b = g.node(2, 2), g.node(2, 2)
        g.join_all([a, b])
        outsider = g.node(2, 2)
        outsider.shutdown()
        # Members learn of a close within moments (their first call opens the watch): look a while.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert not a.is_closed() and not b.is_closed()
            time.sleep(0.1)
        assert a.num_nodes_waiting() == 0


def test_a_lost_member_ends_waits_on_the_round_store(backend: Backend) -> None:
    """A member killed after the seal but before it posted its part of rank assignment: the
    others' wait on the round's store ends once the loss is seen (RoundMemberGoneError), not at
    the store's timeout (300 s). Without liveness nothing is seen: the wait times out as asked."""
    run_id = new_run_id("gone")
    lo = 2 if ELASTIC in backend.capabilities else 3
    with backend.group(run_id, last_call_timeout="60") as g:
        a, b = g.node(lo, 3), g.node(lo, 3)
        victim = backend.process(run_id, lo, 3, last_call_timeout="60")
        try:
            fa, fb = g.join(a), g.join(b)
            store = fa.result(timeout=30).store
            fb.result(timeout=30)
            assert victim.wait_rounds(1)["world_size"] == 3
            victim.kill()
            if LIVENESS not in backend.capabilities:
                with pytest.raises(DistStoreError, match="time") as info:
                    store.wait(["posted-by-the-victim"], timedelta(seconds=2))
                assert not isinstance(info.value, RoundMemberGoneError)
                return
            killed = time.monotonic()
            with pytest.raises(RoundMemberGoneError, match="left") as info:
                store.get("posted-by-the-victim")
            print(f"wait ended {time.monotonic() - killed:.2f} s after the kill (lease_ttl 2 s)")
            assert info.value.round == 1
            store.set("still-usable", "1")  # the store itself is fine
            assert store.get("still-usable") == b"1"
        finally:
            victim.stop()
