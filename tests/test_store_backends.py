"""c10d- and static-specific behaviour: who serves the store, the change log's holes and
wake-ups, configuration errors, fixed ranks, and the torchrun entry points."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points

import pytest
from etcd_harness import free_port
from rdzv_testlib import FAST_CONF, new_run_id, node_group
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
)

from rdzv import create_handler
from rdzv.backends.c10d.store import (
    HOLE,
    ChangeLog,
    LogReader,
    OpCounts,
    StoreConnection,
    serve_store,
)
from rdzv.hosts import is_this_host
from rdzv.rendezvous.settings import ConfigError

# See tests/test_rendezvous_conformance.py: TCPStore may stall on reverse DNS for 5 s.
CONF = {**FAST_CONF, "read_timeout": "15"}


def _params(backend: str, endpoint: str, lo: int = 1, hi: int = 1, run_id: str | None = None, **conf: str):
    return RendezvousParameters(backend, endpoint, run_id or new_run_id(), lo, hi, **{**CONF, **conf})


def _conn(port: int = 0) -> StoreConnection:
    return StoreConnection(serve_store(port, 15.0), "test store", OpCounts())


# ---------------------------------------------------------------- who serves the store


def test_is_this_host() -> None:
    assert is_this_host("localhost")
    assert is_this_host("127.0.0.1")
    assert is_this_host("[::1]")
    assert is_this_host(socket.gethostname())
    assert is_this_host(socket.getfqdn())
    assert not is_this_host("192.0.2.1")  # TEST-NET-1: not ours
    assert not is_this_host("no-such-host.invalid")


def test_port_zero_serves_the_store_here() -> None:
    """`rdzv-launch --standalone` runs c10d on localhost:0: the node picks a port and serves."""
    handler = create_handler(_params("c10d", "localhost:0"))
    try:
        where = handler.backend.describe()
        assert "served by this node" in where and ":0 " not in where
        assert handler.next_rendezvous().world_size == 1
    finally:
        handler.shutdown()
    with pytest.raises(ConfigError, match="port 0"):
        create_handler(_params("c10d", "localhost:0", is_host="false"))


def test_is_host_true_on_a_taken_port_is_an_error() -> None:
    with socket.socket() as other:  # somebody else's listener on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(RendezvousConnectionError, match=f"cannot serve the store on port {port}"):
            create_handler(_params("c10d", f"127.0.0.1:{port}", is_host="true"))


def test_c10d_and_static_refuse_tls_and_auth() -> None:
    for backend in ("c10d", "static"):
        with pytest.raises(ConfigError, match="no TLS"):
            create_handler(_params(backend, f"https://127.0.0.1:{free_port()}", rank="0"))
        with pytest.raises(ConfigError, match="one HOST:PORT"):
            create_handler(_params(backend, "127.0.0.1:1,127.0.0.1:2", rank="0"))


# ---------------------------------------------------------------- the change log


def test_log_reader_reads_batches_and_skips_a_dead_writers_hole() -> None:
    conn = _conn()
    log = ChangeLog("/t/log")
    reader = LogReader(log, conn.clone(), 0)
    log.append(conn, "a")
    log.append(conn, "b")
    assert reader.read(5) == ["a", "b"]
    conn.add(log.seq, 1)  # a writer reserved slot 3 and died before filling it
    log.append(conn, "c")  # slot 4
    got: list[list[str] | None] = []
    thread = threading.Thread(target=lambda: got.append(reader.read(30)))
    thread.start()
    time.sleep(0.3)
    reader.mend(conn, grace=0.2)  # first sighting of the reserved, empty slot
    time.sleep(0.3)
    reader.mend(conn, grace=0.2)  # still empty after the grace period: skipped
    thread.join(10)
    assert got == [["c"]], "the hole is skipped, the entry after it delivered"
    assert conn.get(log.slot(3)) == HOLE.encode()


def test_a_slow_writer_whose_slot_was_skipped_appends_again() -> None:
    conn = _conn()
    log = ChangeLog("/t/slow")
    conn.compare_set(log.slot(1), "", HOLE)  # a reader gave up on slot 1 (or woke itself)
    assert log.append(conn, "x") == 2
    reader = LogReader(log, conn.clone(), 0)
    assert reader.read(5) == ["x"]


def test_wake_ends_a_blocked_read_at_once() -> None:
    conn = _conn()
    log = ChangeLog("/t/wake")
    reader = LogReader(log, conn.clone(), 0)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(reader.read, 3600)
        time.sleep(0.3)
        start = time.monotonic()
        reader.wake(conn)
        assert fut.result(timeout=5) in ([], None)
        assert time.monotonic() - start < 2
    assert log.append(conn, "after") == 2, "the woken slot is skipped by writers"


def test_heartbeats_are_counted_and_cost_one_write_per_interval() -> None:
    with node_group("c10d", f"127.0.0.1:{free_port()}", **CONF) as g:
        node = g.node(1, 1)
        g.join_all([node])
        counts = node.backend.counts
        before = counts.writes
        time.sleep(2.1)  # lease_ttl 2 s: a beat every 0.67 s
        assert 2 <= counts.writes - before <= 5


# ---------------------------------------------------------------- static


def test_static_configuration_errors() -> None:
    ep = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="fixed number of nodes"):
        create_handler(_params("static", ep, 2, 3, rank="0"))
    with pytest.raises(ConfigError, match="--node-rank"):
        create_handler(_params("static", ep, 2, 2))
    with pytest.raises(ConfigError, match="outside 0..1"):
        create_handler(_params("static", ep, 2, 2, rank="2"))


def test_static_other_ranks_wait_for_rank_0() -> None:
    ep = f"127.0.0.1:{free_port()}"
    run_id = new_run_id("static")
    with node_group("static", ep, run_id, **CONF) as g:
        rank1 = g.node(2, 2, rank="1")  # nothing to connect to yet: it waits, as torch's does
        fut = g.join(rank1)
        time.sleep(1.5)
        assert not fut.done()
        rank0 = g.node(2, 2, rank="0")
        infos = g.join_all([rank0]) + [fut.result(timeout=30)]
        assert [i.rank for i in infos] == [0, 1]
        assert rank0.num_nodes_waiting() == 0 and rank1.capabilities == frozenset()


def test_static_duplicate_rank_is_refused() -> None:
    ep = f"127.0.0.1:{free_port()}"
    with node_group("static", ep, **CONF) as g:
        a, b = g.node(2, 2, rank="0"), g.node(2, 2, rank="0")
        futures = [g.join(a), g.join(b)]
        outcomes = []
        for fut in futures:
            try:
                outcomes.append(fut.result(timeout=30).rank)
            except RendezvousError as exc:
                outcomes.append(str(exc))
        assert 0 in outcomes
        assert any(isinstance(o, str) and "more than one node" in o for o in outcomes)


# ---------------------------------------------------------------- torchrun


def test_torchrun_entry_points() -> None:
    eps = {ep.name: ep for ep in entry_points(group="torchrun.handlers")}
    assert {"etcd-v3", "rdzv-etcd-v2", "rdzv-c10d", "rdzv-static"} <= eps.keys(), (
        "install the package (pip install -e .) so torchrun sees the entry points"
    )
    creator = eps["rdzv-c10d"].load()()
    handler = creator(_params("rdzv-c10d", f"127.0.0.1:{free_port()}"))
    try:
        assert handler.get_backend() == "rdzv-c10d"
        assert type(handler.backend).__name__ == "C10dBackend"
        assert handler.next_rendezvous().world_size == 1
    finally:
        handler.shutdown()
    handler = eps["rdzv-static"].load()()(_params("rdzv-static", f"127.0.0.1:{free_port()}", rank="0"))
    try:
        assert handler.get_backend() == "rdzv-static"
        assert handler.next_rendezvous().rank == 0
    finally:
        handler.shutdown()
