"""The fault-injecting proxy (tests/etcd_fault_proxy.py) in front of a real etcd 3.4.

Calls and streams pass through unchanged (metadata, deadline, upstream errors), rules fail or
hold exactly the calls they name, counters count, and stop() leaves no thread behind. The
project's client is asserted on message texts only: its error classes are being changed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from etcd_fault_proxy import FaultProxy
from etcd_fault_rules import (
    LEADER_CHANGED,
    NO_LEADER,
    NO_SPACE,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    TOO_MANY_REQUESTS,
    TOO_MANY_REQUESTS_EXHAUSTED,
    CallStats,
    EtcdStatus,
)
from etcd_harness import EtcdServer
from waiting import wait_until

from rdzv.etcd import Compare, EtcdClient, Op
from rdzv.etcd.proto import etcd_min_pb2 as pb
from rdzv.etcd.proto import etcd_min_pb2_grpc as pbg


@pytest.fixture
def prefix() -> str:
    return f"/fault-proxy/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def client(etcd_fault_proxy: FaultProxy) -> Iterator[EtcdClient]:
    """The project's client, dialling the proxy."""
    with EtcdClient(etcd_fault_proxy.endpoint, timeout=3.0, connect_timeout=2.0) as c:
        yield c


@pytest.fixture
def direct(proxied_etcd: EtcdServer) -> Iterator[EtcdClient]:
    """The project's client on etcd itself, to see what really reached it."""
    with EtcdClient(proxied_etcd.endpoint, timeout=3.0) as c:
        yield c


@pytest.fixture
def channel(etcd_fault_proxy: FaultProxy) -> Iterator[grpc.Channel]:
    """A plain gRPC channel to the proxy, for asserting exact codes."""
    ch = grpc.insecure_channel(etcd_fault_proxy.endpoint)
    try:
        yield ch
    finally:
        ch.close()


def stats_of(proxy: FaultProxy, method: str) -> CallStats:
    return proxy.stats().get(method, CallStats())


def range_req(key: str = "/fault-proxy/none") -> pb.RangeRequest:
    return pb.RangeRequest(key=key.encode())


def test_kv_calls_pass_through(
    etcd_fault_proxy: FaultProxy, client: EtcdClient, direct: EtcdClient, prefix: str
) -> None:
    key = prefix + "k"
    revision = client.put(key, "v1")
    kv = direct.get(key)
    assert kv is not None and kv.value == b"v1" and kv.mod_revision == revision
    got = client.get(key)
    assert got is not None and got.value == b"v1"

    result = client.txn([Compare.value(key) == "v1"], [Op.put(key, "v2")], [Op.get(key)])
    assert result.succeeded
    kv = direct.get(key)
    assert kv is not None and kv.value == b"v2"
    assert client.delete(key) == 1

    stats = etcd_fault_proxy.stats()
    for method in ("Put", "Range", "Txn", "DeleteRange"):
        assert stats[method] == CallStats(seen=1, responses=1), method


def test_keep_alive_and_watch_streams_pass_through(
    etcd_fault_proxy: FaultProxy, client: EtcdClient, direct: EtcdClient, prefix: str
) -> None:
    lease = client.lease_grant(5)
    client.keep_alive(lease.id, interval=0.1)
    try:
        # An answer on the stream means etcd got the keep-alive through the proxy.
        wait_until(
            lambda: stats_of(etcd_fault_proxy, "LeaseKeepAlive").responses >= 3,
            10,
            "three keep-alive answers through the proxy",
        )
        assert client.lease_keeper.keep_alive_lag(lease.id) is not None
        assert direct.lease_time_to_live(lease.id) > 0
    finally:
        client.stop_keep_alive(lease.id)
        client.lease_revoke(lease.id)

    with client.watch(prefix, prefix=True) as watch:
        direct.put(prefix + "w", "x")
        batch = watch.get(timeout=5)
    assert batch is not None and [(e.type, e.kv.key) for e in batch] == [
        ("PUT", (prefix + "w").encode())
    ]
    assert stats_of(etcd_fault_proxy, "LeaseKeepAlive").seen == 1
    assert stats_of(etcd_fault_proxy, "Watch").seen == 1


def test_metadata_deadline_and_upstream_errors_pass_unchanged(
    etcd_fault_proxy: FaultProxy,
) -> None:
    # A second proxy in front of the fixture's: the inner one sees what the outer forwarded.
    with FaultProxy(etcd_fault_proxy.endpoint) as outer:
        with EtcdClient(outer.endpoint, timeout=2.0) as c:
            c.get("/fault-proxy/none")
        seen = etcd_fault_proxy.last_seen("Range")
        assert seen is not None
        assert ("hasleader", "true") in seen.metadata
        assert seen.timeout is not None and 0 < seen.timeout <= 2.05

        etcd_fault_proxy.inject("Range", error=TOO_MANY_REQUESTS, first_n=1)
        with grpc.insecure_channel(outer.endpoint) as ch:
            kv = pbg.KVStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                kv.Range(range_req(), timeout=2, metadata=[("x-test", "yes")])
            assert info.value.code() == grpc.StatusCode.UNKNOWN
            assert info.value.details() == "etcdserver: too many requests"
            seen = etcd_fault_proxy.last_seen("Range")
            assert seen is not None and ("x-test", "yes") in seen.metadata
            kv.Range(range_req(), timeout=2)  # first_n=1: the next one passes
        assert outer.stats()["Range"] == CallStats(seen=3, responses=2)


def test_first_n_failures_reach_the_client(
    etcd_fault_proxy: FaultProxy, client: EtcdClient, direct: EtcdClient, prefix: str
) -> None:
    key = prefix + "k"
    rule = etcd_fault_proxy.inject({"Put"}, error=REQUEST_TOO_LARGE, first_n=2)
    for _ in range(2):
        with pytest.raises(Exception, match="etcdserver: request is too large"):
            client.put(key, "v")
    assert direct.get(key) is None  # failed by the proxy: etcd never saw them
    client.put(key, "v")
    assert direct.get(key) is not None
    assert (rule.matched, rule.fired) == (3, 2)
    assert etcd_fault_proxy.stats()["Put"] == CallStats(seen=3, failed=2, responses=1)


@pytest.mark.parametrize(
    "status",
    [
        TOO_MANY_REQUESTS,
        TOO_MANY_REQUESTS_EXHAUSTED,
        NO_SPACE,
        NO_LEADER,
        LEADER_CHANGED,
        REQUEST_TIMEOUT,
        EtcdStatus(grpc.StatusCode.FAILED_PRECONDITION, "made up by the test"),
    ],
    ids=lambda s: s.details,
)
def test_the_status_arrives_exactly(
    etcd_fault_proxy: FaultProxy, channel: grpc.Channel, status: EtcdStatus
) -> None:
    etcd_fault_proxy.inject("/etcdserverpb.KV/Range", code=status.code, details=status.details)
    with pytest.raises(grpc.RpcError) as info:
        pbg.KVStub(channel).Range(range_req(), timeout=2)
    assert (info.value.code(), info.value.details()) == (status.code, status.details)


def test_a_fraction_is_the_same_calls_for_the_same_seed(
    etcd_fault_proxy: FaultProxy, channel: grpc.Channel
) -> None:
    kv = pbg.KVStub(channel)

    def failures(seed: int) -> list[bool]:
        etcd_fault_proxy.reset()
        etcd_fault_proxy.inject("Range", error=NO_SPACE, fraction=0.3, seed=seed)
        out = []
        for _ in range(40):
            try:
                kv.Range(range_req(), timeout=2)
                out.append(False)
            except grpc.RpcError as e:
                assert e.details() == NO_SPACE.details
                out.append(True)
        return out

    first = failures(seed=1)
    assert 4 <= sum(first) <= 20
    assert etcd_fault_proxy.stats()["Range"] == CallStats(
        seen=40, failed=sum(first), responses=40 - sum(first)
    )
    assert failures(seed=1) == first
    assert failures(seed=2) != first


def test_a_stream_opening_can_fail(
    etcd_fault_proxy: FaultProxy, client: EtcdClient, channel: grpc.Channel, prefix: str
) -> None:
    etcd_fault_proxy.inject("Watch", error=NO_LEADER, first_n=1)
    create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=prefix.encode()))
    call = pbg.WatchStub(channel).Watch(iter([create]), timeout=2)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert (info.value.code(), info.value.details()) == (NO_LEADER.code, NO_LEADER.details)

    # The project's client re-opens its watch stream after such a refusal.
    etcd_fault_proxy.inject("Watch", error=NO_LEADER, first_n=2)
    with client.watch(prefix, prefix=True, timeout=5):
        pass
    assert etcd_fault_proxy.stats()["Watch"].failed == 3


def test_a_stall_holds_calls_until_their_deadline_or_clear(
    etcd_fault_proxy: FaultProxy, client: EtcdClient, channel: grpc.Channel
) -> None:
    etcd_fault_proxy.stall("Range")
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - its class is the client's business
        client.get("/fault-proxy/none", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5.0
    assert stats_of(etcd_fault_proxy, "Range").responses == 0

    etcd_fault_proxy.reset()  # the client may have tried more than once: count afresh
    etcd_fault_proxy.stall("Range")
    kv = pbg.KVStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        kv.Range(range_req(), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    held = kv.Range.future(range_req(), timeout=30)
    wait_until(lambda: stats_of(etcd_fault_proxy, "Range").stalled == 2, 10, "a second held call")
    etcd_fault_proxy.clear()
    held.result(timeout=10)  # released by clear(), then forwarded
    assert etcd_fault_proxy.stats()["Range"] == CallStats(seen=2, stalled=2, responses=1)


def test_stall_all_holds_calls_and_stream_messages_until_resume(
    etcd_fault_proxy: FaultProxy,
    client: EtcdClient,
    direct: EtcdClient,
    channel: grpc.Channel,
    prefix: str,
) -> None:
    with client.watch(prefix, prefix=True) as watch:
        etcd_fault_proxy.stall_all()
        direct.put(prefix + "a", "1")
        held = pbg.KVStub(channel).Range.future(range_req(), timeout=30)
        wait_until(lambda: stats_of(etcd_fault_proxy, "Range").stalled == 1, 10, "a held call")
        assert watch.get(timeout=0.3) is None  # the event waits in the proxy
        assert not held.done()

        etcd_fault_proxy.resume()
        held.result(timeout=10)
        batch = watch.get(timeout=10)
    assert batch is not None and batch[0].kv.key == (prefix + "a").encode()


def test_rules_refuse_misspelt_methods_and_mixed_choices(etcd_fault_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="Txns"):
        etcd_fault_proxy.inject({"Txns"}, error=NO_LEADER)
    with pytest.raises(ValueError):
        etcd_fault_proxy.inject("Txn", error=NO_LEADER, fraction=0.5, first_n=2)
    with pytest.raises(ValueError):
        etcd_fault_proxy.inject("Txn", error=NO_LEADER, code=grpc.StatusCode.UNKNOWN)
    with pytest.raises(ValueError):
        etcd_fault_proxy.stall("Txn", fraction=1.5)


def test_stop_ends_every_thread_and_call(proxied_etcd: EtcdServer, prefix: str) -> None:
    before = set(threading.enumerate())
    proxy = FaultProxy(proxied_etcd.endpoint).start()
    client = EtcdClient(proxy.endpoint, timeout=3.0)
    channel = grpc.insecure_channel(proxy.endpoint)
    try:
        lease = client.lease_grant(5)
        client.keep_alive(lease.id, interval=0.1)
        watch = client.watch(prefix, prefix=True)
        wait_until(lambda: stats_of(proxy, "LeaseKeepAlive").responses >= 1, 5, "a keep-alive")
        proxy.stall("Range")
        held = pbg.KVStub(channel).Range.future(range_req(), timeout=10)
        wait_until(lambda: stats_of(proxy, "Range").stalled == 1, 5, "a held call")

        proxy.stop()
        assert proxy.live_threads() == []
        assert isinstance(held.exception(timeout=5), grpc.RpcError)
        watch.cancel()
    finally:
        client.close()
        channel.close()
        proxy.stop()
    wait_until(
        lambda: set(threading.enumerate()) <= before,
        5,
        "the threads of the proxy and its calls to end",
        lambda: str(sorted(t.name for t in set(threading.enumerate()) - before)),
    )
