"""rdzv.etcd against real etcd 3.4 and 3.5 servers (fixtures in conftest.py)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from etcd_harness import AuthInfo, EtcdCluster, EtcdServer, TLSInfo, free_port
from waiting import wait_until

from rdzv.etcd import (
    Compare,
    EtcdAuthError,
    EtcdClient,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdLeaseNotFoundError,
    EtcdTLSError,
    Event,
    Op,
    Session,
    Watch,
    prefix_end,
)


@pytest.fixture
def client(etcd: EtcdServer) -> Iterator[EtcdClient]:
    c = EtcdClient(etcd.endpoint, timeout=5.0, connect_timeout=2.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def ns() -> str:
    """A fresh key prefix per test (servers are shared per module)."""
    return f"/t/{uuid.uuid4().hex[:8]}/"


def _drain(w: Watch, want: int, timeout: float = 5.0) -> list[Event]:
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        batch = w.get(max(deadline - time.monotonic(), 0.0))
        if batch is None:
            break
        got.extend(batch)
    return got




# ------------------------------------------------------------------------------ helpers


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end("ab\xff".encode("latin-1")) == b"ac"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


def test_endpoint_parsing_and_repr() -> None:
    c = EtcdClient(
        ["http://h1:1", "h2:2", "  "], user="u", password="sekrit-pw", connect_timeout=0.5
    )
    try:
        assert c.endpoints == ["h1:1", "h2:2"]
        assert "sekrit-pw" not in repr(c) and "sekrit-pw" not in str(vars(c._transport).get("_metadata"))
    finally:
        c.close()
    c = EtcdClient("https://a:1,b:2")
    assert c.endpoints == ["a:1", "b:2"]
    c.close()
    with pytest.raises(ValueError):
        EtcdClient("ftp://x:1")
    with pytest.raises(ValueError):
        EtcdClient("h:1", cert="/nonexistent")


def test_compare_builders() -> None:
    assert (Compare.version("k") > 0).pb.result == 1
    assert (Compare.mod_revision(b"k") != 3).pb.mod_revision == 3
    assert (Compare.value("k") == "v").pb.value == b"v"
    with pytest.raises(TypeError):
        Compare.value("k") == 3  # noqa: B015 - the comparison itself raises
    with pytest.raises(TypeError):
        Compare.version("k") == b"x"  # noqa: B015


# ------------------------------------------------------------------------------ KV


def test_put_get_metadata(client: EtcdClient, ns: str) -> None:
    assert client.get(ns + "missing") is None
    rev = client.put(ns + "k", "v1")
    kv = client.get(ns + "k")
    assert kv is not None
    assert (kv.key, kv.value) == ((ns + "k").encode(), b"v1")
    assert kv.create_revision == kv.mod_revision == rev
    assert kv.version == 1 and kv.lease == 0
    rev2 = client.put((ns + "k").encode(), b"v2")
    kv2 = client.get(ns + "k")
    assert kv2 is not None and rev2 > rev
    assert (kv2.value, kv2.version, kv2.create_revision, kv2.mod_revision) == (b"v2", 2, rev, rev2)
    old = client.get(ns + "k", revision=rev)
    assert old is not None and old.value == b"v1"


def test_prefix_range_count_and_options(client: EtcdClient, ns: str) -> None:
    for i in range(5):
        client.put(f"{ns}p/{i}", str(i))
    client.put(ns + "q", "outside")
    r = client.range(ns + "p/", prefix=True)
    assert [kv.value for kv in r.kvs] == [b"0", b"1", b"2", b"3", b"4"]
    assert r.count == 5 and not r.more and r.revision >= r.kvs[-1].mod_revision
    c = client.range(ns + "p/", prefix=True, count_only=True)
    assert c.count == 5 and c.kvs == []
    lim = client.range(ns + "p/", prefix=True, limit=2)
    assert len(lim.kvs) == 2 and lim.more and lim.count == 5
    keys = client.range(ns + "p/", prefix=True, keys_only=True)
    assert all(kv.value == b"" for kv in keys.kvs)
    desc = client.range(ns + "p/", prefix=True, sort_order="descend", sort_target="key")
    assert [kv.value for kv in desc.kvs] == [b"4", b"3", b"2", b"1", b"0"]
    sub = client.range(ns + "p/1", ns + "p/3")
    assert [kv.value for kv in sub.kvs] == [b"1", b"2"]


def test_delete(client: EtcdClient, ns: str) -> None:
    client.put(ns + "a", "1")
    assert client.delete(ns + "a") == 1
    assert client.delete(ns + "a") == 0
    for i in range(3):
        client.put(f"{ns}d/{i}", "x")
    client.put(ns + "keep", "x")
    assert client.delete(ns + "d/", prefix=True, idempotent=True) == 3
    assert client.range(ns, prefix=True, count_only=True).count == 1


def test_txn_compares(client: EtcdClient, ns: str) -> None:
    k = ns + "cas"
    create = (
        [Compare.create_revision(k) == 0],
        [Op.put(k, "first")],
        [Op.get(k)],
    )
    r1 = client.txn(*create)
    assert r1.succeeded and r1.responses == [r1.revision]
    r2 = client.txn(*create)
    assert not r2.succeeded
    got = r2.responses[0]
    assert got.kvs[0].value == b"first"  # type: ignore[union-attr]
    rev = got.kvs[0].mod_revision  # type: ignore[union-attr]

    # mod_revision: current wins, stale loses.
    assert client.txn([Compare.mod_revision(k) == rev], [Op.put(k, "second")]).succeeded
    assert not client.txn([Compare.mod_revision(k) == rev], [Op.put(k, "lost")]).succeeded
    # version, value, create_revision, !=, <.
    assert client.txn([Compare.version(k) > 1]).succeeded
    assert client.txn([Compare.version(k) < 3]).succeeded
    assert client.txn([Compare.value(k) == b"second"]).succeeded
    assert not client.txn([Compare.value(k) == "first"]).succeeded
    assert client.txn([Compare.value(k) != "first"]).succeeded
    assert client.txn([Compare.create_revision(k) == rev]).succeeded
    assert client.txn([Compare.lease(k) == 0]).succeeded
    # Mixed ops and their responses.
    client.put(ns + "x/1", "a")
    r = client.txn(
        [Compare.version(k) > 0],
        [Op.get(ns + "x/", prefix=True), Op.delete(ns + "x/", prefix=True), Op.put(ns + "y", "b")],
    )
    assert r.succeeded
    assert r.responses[0].count == 1  # type: ignore[union-attr]
    assert r.responses[1:] == [1, r.revision]
    nested = client.txn([], [Op.txn([Compare.version(ns + "y") > 0], [Op.get(ns + "y")])])
    inner = nested.responses[0]
    assert inner.succeeded and inner.responses[0].kvs[0].value == b"b"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ leases


def test_lease_keepalive_keeps_key_then_expires(client: EtcdClient, ns: str) -> None:
    lease = client.lease_grant(2)
    assert lease.ttl == 2 and lease.id > 0
    lost = threading.Event()
    reg = client.keep_alive(lease.id, lease.ttl, on_lost=lambda _id: lost.set())
    client.put(ns + "leased", "v", lease=lease.id)
    time.sleep(3.2)  # past the TTL: only the keep-alives keep it
    kv = client.get(ns + "leased")
    assert kv is not None and kv.lease == lease.id
    assert client.lease_time_to_live(lease.id) > 0
    assert not lost.is_set()
    client.stop_keep_alive(lease.id, reg)
    wait_until(lambda: client.get(ns + "leased") is None, 5.0, "the leased key to go")
    assert client.lease_time_to_live(lease.id) == -1
    assert not lost.is_set()  # stopped on purpose: no callback


def test_keep_alive_lag_grows_while_etcd_is_stalled(client: EtcdClient, etcd: EtcdServer) -> None:
    lease = client.lease_grant(30)
    keeper = client.lease_keeper
    assert keeper.keep_alive_lag(lease.id) is None, "not kept yet"
    client.keep_alive(lease.id, lease.ttl, interval=0.2)
    wait_until(lambda: keeper.keep_alive_lag(lease.id) == 0.0, 5, "etcd to answer a keep-alive")
    etcd.member.pause()
    try:
        # Past the point where the keeper gives the stalled stream up and opens another: the
        # lag counts from the first unanswered keep-alive, across streams.
        stall = max(0.5, min(client.timeout, lease.ttl / 3))
        wait_until(lambda: (keeper.keep_alive_lag(lease.id) or 0.0) > stall + 2, stall + 20, "the lag to grow")
    finally:
        etcd.member.resume()
    wait_until(lambda: keeper.keep_alive_lag(lease.id) == 0.0, 30, "etcd to answer again")
    client.stop_keep_alive(lease.id)
    assert keeper.keep_alive_lag(lease.id) is None
    client.lease_revoke(lease.id)


def test_lease_revoke(client: EtcdClient, ns: str) -> None:
    lease = client.lease_grant(30)
    client.put(ns + "r", "v", lease=lease.id)
    client.lease_revoke(lease.id)
    assert client.get(ns + "r") is None
    assert client.lease_time_to_live(lease.id) == -1
    with pytest.raises(EtcdLeaseNotFoundError):
        client.put(ns + "r", "v", lease=lease.id)
    with pytest.raises(EtcdLeaseNotFoundError):
        client.lease_revoke(lease.id)


def test_on_lost_when_revoked_elsewhere(client: EtcdClient, etcd: EtcdServer) -> None:
    lease = client.lease_grant(3)
    lost: list[int] = []
    fired = threading.Event()

    def on_lost(lease_id: int) -> None:
        lost.append(lease_id)
        fired.set()

    client.keep_alive(lease.id, lease.ttl, interval=0.3, on_lost=on_lost)
    etcd.etcdctl("lease", "revoke", f"{lease.id:x}")
    assert fired.wait(3.0)
    time.sleep(0.5)
    assert lost == [lease.id]  # exactly once
    assert not client.lease_keeper.is_kept(lease.id)


def test_many_leases_one_stream(client: EtcdClient) -> None:
    leases = [client.lease_grant(2) for _ in range(20)]
    for lease in leases:
        client.keep_alive(lease.id, lease.ttl)
    time.sleep(2.5)
    assert all(client.lease_time_to_live(lease.id) > 0 for lease in leases)
    names = [t.name for t in threading.enumerate()]
    assert names.count("rdzv-etcd-keepalive") == 1
    assert names.count("rdzv-etcd-keepalive-rx") == 1
    for lease in leases:
        client.stop_keep_alive(lease.id)
        client.lease_revoke(lease.id)


def test_session(client: EtcdClient, etcd: EtcdServer, ns: str) -> None:
    with Session(client, ttl=2) as s:
        client.put(ns + "s", "v", lease=s.lease_id)
        time.sleep(2.5)
        assert client.get(ns + "s") is not None and not s.lost.is_set()
    assert client.get(ns + "s") is None  # close() revoked it
    s.close()  # idempotent

    s2 = Session(client, ttl=2)
    etcd.etcdctl("lease", "revoke", f"{s2.lease_id:x}")
    assert s2.lost.wait(3.0)
    s2.close()


# ------------------------------------------------------------------------------ watches


def test_watch_history_then_live_and_cancel(client: EtcdClient, ns: str) -> None:
    revs = [client.put(f"{ns}w/{i}", str(i)) for i in range(5)]
    w = client.watch(ns + "w/", prefix=True, start_revision=revs[0])
    hist = _drain(w, 5)
    assert [(e.type, e.kv.value) for e in hist] == [("PUT", str(i).encode()) for i in range(5)]
    client.put(ns + "other", "x")  # outside the prefix
    for i in range(5, 8):
        client.put(f"{ns}w/{i}", str(i))
    drev = client.delete(ns + "w/0")
    assert drev == 1
    live = _drain(w, 4)
    assert [(e.type, e.kv.key) for e in live] == [
        ("PUT", f"{ns}w/5".encode()),
        ("PUT", f"{ns}w/6".encode()),
        ("PUT", f"{ns}w/7".encode()),
        ("DELETE", f"{ns}w/0".encode()),
    ]
    revisions = [e.kv.mod_revision for e in hist + live]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert w.revision == live[-1].kv.mod_revision
    w.cancel()
    client.put(ns + "w/9", "late")
    assert w.get(0.3) is None
    assert list(w) == []


def test_watch_from_now_and_filters(client: EtcdClient, ns: str) -> None:
    client.put(ns + "f", "before")
    w = client.watch(ns + "f", filters=["noput"], prev_kv=True)
    client.put(ns + "f", "after")
    client.delete(ns + "f")
    evs = _drain(w, 1)
    assert [e.type for e in evs] == ["DELETE"]
    assert evs[0].prev_kv is not None and evs[0].prev_kv.value == b"after"
    assert w.get(0.2) is None
    w.cancel()


def test_many_watches_share_one_stream(client: EtcdClient, ns: str) -> None:
    watches = [client.watch(f"{ns}m/{i}") for i in range(40)]
    assert client.watch_hub.active >= 40
    for i in reversed(range(40)):
        client.put(f"{ns}m/{i}", str(i))
    for i, w in enumerate(watches):
        evs = _drain(w, 1)
        assert [e.kv.value for e in evs] == [str(i).encode()], i
    names = [t.name for t in threading.enumerate()]
    assert names.count("rdzv-etcd-watch") == 1
    for w in watches[::2]:
        w.cancel()
    for i in range(40):
        client.put(f"{ns}m/{i}", "again")
    for i, w in enumerate(watches):
        if i % 2:
            assert [e.kv.value for e in _drain(w, 1)] == [b"again"]
        else:
            assert w.get(0) is None
    for w in watches:
        w.cancel()


def test_watch_compacted(client: EtcdClient, ns: str) -> None:
    first = client.put(ns + "c", "0")
    for i in range(3):
        last = client.put(ns + "c", str(i + 1))
    client.compact(last)
    w = client.watch(ns + "c", start_revision=first)
    with pytest.raises(EtcdCompactedError) as ei:
        w.get(5.0)
    assert ei.value.compact_revision == last
    w.cancel()
    with pytest.raises(EtcdCompactedError):
        client.get(ns + "c", revision=first)


# ------------------------------------------------------------------------------ sharing


def test_shared_client_refcount(etcd: EtcdServer) -> None:
    a = EtcdClient.shared(etcd.endpoint, timeout=4.0)
    b = EtcdClient.shared([etcd.endpoint], timeout=4.0)
    other = EtcdClient.shared(etcd.endpoint, timeout=3.0)
    try:
        assert a is b and a.refcount == 2 and other is not a
        a.close()
        assert not b.closed
        b.put("/t/shared", "ok")
        b.close()
        assert b.closed
        c = EtcdClient.shared(etcd.endpoint, timeout=4.0)
        assert c is not a and c.get("/t/shared") is not None
        c.close()
    finally:
        other.close()


def test_threads_share_one_client(client: EtcdClient, ns: str) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                client.put(f"{ns}th/{t}/{i}", "v")
                assert client.get(f"{ns}th/{t}/{i}") is not None
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert client.range(ns + "th/", prefix=True, count_only=True).count == 200


def test_latency_sanity(client: EtcdClient, ns: str) -> None:
    # Loose bound: catches per-call channel/stub creation, not machine noise.
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        client.put(ns + "lat", "x" * 64)
        samples.append(time.perf_counter() - t)
    samples.sort()
    assert samples[100] < 0.005


# ------------------------------------------------------------------------------ failover


@pytest.mark.slow
@pytest.mark.parametrize("role", ["follower", "leader"])
def test_failover_put_watch_and_lease(etcd_cluster: EtcdCluster, role: str) -> None:
    leader = etcd_cluster.wait_leader()
    others = [m for m in etcd_cluster.members if m is not leader]
    victim = leader if role == "leader" else others[0]
    order = [victim] + [m for m in etcd_cluster.members if m is not victim]
    c = EtcdClient([m.client_url for m in order], timeout=4.0, connect_timeout=1.0)
    try:
        assert c.endpoint == victim.endpoint
        c.put("/fo/0", "0")
        w = c.watch("/fo/", prefix=True)
        lease = c.lease_grant(3)
        lost = threading.Event()
        c.keep_alive(lease.id, lease.ttl, on_lost=lambda _id: lost.set())
        c.put("/fo/1", "1")
        assert [e.kv.value for e in _drain(w, 1)] == [b"1"]

        victim.kill()
        t0 = time.monotonic()
        # The first write after a kill may go out on the dead connection (gRPC then cannot say
        # whether it was delivered), and a leader kill can swallow the in-flight proposal: only
        # a write marked safe to repeat fails over transparently.
        c.put("/fo/2", "2", idempotent=True)
        took = time.monotonic() - t0
        assert took < 6.0, took
        assert c.endpoint != victim.endpoint
        for i in range(3, 6):
            c.put(f"/fo/{i}", str(i), idempotent=True)
        evs = _drain(w, 4, timeout=10.0)
        assert [e.kv.value for e in evs] == [b"2", b"3", b"4", b"5"]
        assert w.get(0.2) is None  # nothing duplicated by the re-create
        time.sleep(3.5)  # past the lease TTL: the keep-alive stream moved too
        assert not lost.is_set()
        assert c.lease_time_to_live(lease.id) > 0
        w.cancel()
    finally:
        c.close()


# ------------------------------------------------------------------------------ TLS


def test_tls_mutual(etcd_tls: TLSInfo) -> None:
    certs = etcd_tls.certs
    with EtcdClient(
        etcd_tls.endpoint,
        ca_cert=str(certs.ca_cert),
        cert=str(certs.client_cert),
        key=str(certs.client_key),
    ) as c:
        c.put("/tls/k", "v")
        assert c.get("/tls/k").value == b"v"  # type: ignore[union-attr]
        w = c.watch("/tls/k")
        c.put("/tls/k", "w")
        assert [e.kv.value for e in _drain(w, 1)] == [b"w"]
        w.cancel()
    url = etcd_tls.server.client_urls[0]
    assert url.startswith("https://")
    with EtcdClient(
        url, ca_cert=str(certs.ca_cert), cert=str(certs.client_cert), key=str(certs.client_key)
    ) as c:
        assert c.check().version


@pytest.mark.parametrize("case", ["no-client-cert", "untrusted-ca", "foreign-client-cert"])
def test_tls_rejections_are_fast_and_clear(etcd_tls: TLSInfo, case: str) -> None:
    certs = etcd_tls.certs
    kwargs = {
        "no-client-cert": {"ca_cert": str(certs.ca_cert)},
        "untrusted-ca": {
            "ca_cert": str(certs.other_ca_cert),
            "cert": str(certs.client_cert),
            "key": str(certs.client_key),
        },
        "foreign-client-cert": {
            "ca_cert": str(certs.ca_cert),
            "cert": str(certs.other_client_cert),
            "key": str(certs.other_client_key),
        },
    }[case]
    with EtcdClient(etcd_tls.endpoint, connect_timeout=3.0, **kwargs) as c:  # type: ignore[arg-type]
        t0 = time.monotonic()
        with pytest.raises(EtcdTLSError) as ei:
            c.get("/tls/k")
        assert time.monotonic() - t0 < 2.0
    msg = str(ei.value)
    assert etcd_tls.endpoint in msg and "TLS" in msg
    assert ("not trusted" in msg) == (case == "untrusted-ca")
    assert isinstance(ei.value, EtcdConnectionError) and isinstance(ei.value, EtcdAuthError)


def test_plaintext_to_tls_server_is_a_connection_error(etcd_tls: TLSInfo) -> None:
    with (
        EtcdClient(etcd_tls.endpoint, tls=False, connect_timeout=1.0) as c,
        pytest.raises(EtcdConnectionError, match=etcd_tls.endpoint),
    ):
        c.check()


# ------------------------------------------------------------------------------ auth


def test_auth(etcd_auth: AuthInfo) -> None:
    p = etcd_auth.prefix
    with EtcdClient(etcd_auth.endpoint, user=etcd_auth.user, password=etcd_auth.password) as c:
        c.check()
        c.put(p + "k", "v")
        assert c.get(p + "k").value == b"v"  # type: ignore[union-attr]
        with pytest.raises(EtcdAuthError, match="permission denied"):
            c.put("/outside", "v")
        w = c.watch(p, prefix=True)
        c.put(p + "k", "w")
        assert [e.kv.value for e in _drain(w, 1)] == [b"w"]
        w.cancel()
        with pytest.raises(EtcdAuthError):
            c.watch("/outside")
        # A token etcd no longer knows is replaced transparently (one re-auth).
        c._transport._token = "bogus.1"
        c._transport._metadata = (("hasleader", "true"), ("token", "bogus.1"))
        assert c.get(p + "k") is not None
        lease = c.lease_grant(2)
        c.keep_alive(lease.id, lease.ttl)
        time.sleep(2.5)
        assert c.lease_time_to_live(lease.id) > 0
        assert etcd_auth.password not in repr(c)


def test_auth_wrong_password_is_fast(etcd_auth: AuthInfo) -> None:
    with EtcdClient(etcd_auth.endpoint, user=etcd_auth.user, password="wrong") as c:
        t0 = time.monotonic()
        with pytest.raises(EtcdAuthError) as ei:
            c.get(etcd_auth.prefix + "k")
        assert time.monotonic() - t0 < 2.0
        assert "wrong" not in str(ei.value)
        with pytest.raises(EtcdAuthError):
            c.check()
    with (
        EtcdClient(etcd_auth.endpoint) as anon,
        pytest.raises(EtcdAuthError, match="user name is empty"),
    ):
        anon.get(etcd_auth.prefix + "k")


# ------------------------------------------------------------------------------ unreachable


def test_unreachable_endpoint_named_within_connect_timeout() -> None:
    port = free_port()
    with EtcdClient(f"127.0.0.1:{port}", connect_timeout=1.0, timeout=5.0) as c:
        t0 = time.monotonic()
        with pytest.raises(EtcdConnectionError) as ei:
            c.check()
        assert time.monotonic() - t0 < 2.0
        assert str(ei.value) == f"etcd at 127.0.0.1:{port} unreachable: connection refused"
        with pytest.raises(EtcdConnectionError):
            c.put("/k", "v")
        assert time.monotonic() - t0 < 4.0


def test_unreachable_lists_every_endpoint_and_cause() -> None:
    refused = free_port()
    # A listener that never accepts: TCP connects, HTTP/2 never starts (like a black hole).
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        stuck = hole.getsockname()[1]
        with EtcdClient([f"127.0.0.1:{refused}", f"127.0.0.1:{stuck}"], connect_timeout=1.0) as c:
            t0 = time.monotonic()
            with pytest.raises(EtcdConnectionError) as ei:
                c.get("/k")
            assert time.monotonic() - t0 < 3.5
    msg = str(ei.value)
    assert f"127.0.0.1:{refused} (connection refused)" in msg
    assert f"127.0.0.1:{stuck} (" in msg


def test_dead_endpoint_skipped_for_live_one(etcd: EtcdServer) -> None:
    with EtcdClient([f"127.0.0.1:{free_port()}", etcd.endpoint], connect_timeout=1.0) as c:
        c.put("/t/skip", "v")  # a never-sent write may move on without idempotent=True
        assert c.endpoint == etcd.endpoint
        assert c.get("/t/skip") is not None
