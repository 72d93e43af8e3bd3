"""etcd-v2-specific behaviour: key hygiene and expiry, the round store, event-history loss,
TLS, basic auth, failover, and the error when the server has no v2 API."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import etcd
import pytest
from etcd_harness import VERSIONS, EtcdHarnessError, EtcdServer
from rdzv_testlib import NodeProcess, new_run_id, node_group
from torch.distributed import DistStoreError
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
from waiting import wait_until

from rdzv import create_handler
from rdzv.backends.etcd_v2.client import EtcdV2Client
from rdzv.backends.etcd_v2.store import EtcdV2Store
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.settings import parse_settings

FAST = {"lease_ttl": "2", "last_call_timeout": "1", "join_timeout": "30", "read_timeout": "5"}


def _start(version: str, **kwargs: object) -> EtcdServer:
    try:
        return EtcdServer(version, enable_v2=True, **kwargs).start()  # type: ignore[arg-type]
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"etcd{v}" for v in VERSIONS])
def v2(request: pytest.FixtureRequest) -> Iterator[EtcdServer]:
    server = _start(request.param)
    try:
        yield server
    finally:
        server.stop()


def _leaves(endpoint: str, path: str) -> list[str]:
    host, port = endpoint.rsplit(":", 1)
    client = etcd.Client(host=host, port=int(port))
    try:
        return [n.key for n in client.read(path, recursive=True).leaves if not n.dir]
    except etcd.EtcdKeyNotFound:
        return []


def _params(endpoint: str, run_id: str | None = None, lo: int = 1, hi: int = 1, **conf: str) -> RendezvousParameters:
    return RendezvousParameters("etcd-v2", endpoint, run_id or new_run_id(), lo, hi, **{**FAST, **conf})


def test_no_v2_api_is_a_clear_error() -> None:
    server = EtcdServer("3.5").start()  # no --enable-v2
    try:
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="--enable-v2") as info:
            create_handler(_params(server.endpoint))
        assert "--rdzv-backend=etcd" in str(info.value) and server.endpoint in str(info.value)
        assert time.monotonic() - start < 10
    finally:
        server.stop()


def test_no_keys_left_after_a_clean_end(v2: EtcdServer) -> None:
    run_id = new_run_id("clean")
    with node_group("etcd-v2", v2.endpoint, run_id) as g:
        infos = g.join_all([g.node(2, 2) for _ in range(2)])
        infos[0].store.set("k", "v")
        assert _leaves(v2.endpoint, f"/rdzv/{run_id}"), "a running job has keys"
    assert _leaves(v2.endpoint, f"/rdzv/{run_id}") == []


def test_crashed_job_keys_expire(v2: EtcdServer) -> None:
    run_id = new_run_id("crash")
    procs = [NodeProcess("etcd-v2", v2.endpoint, run_id, 2, 2) for _ in range(2)]
    try:
        for p in procs:
            p.wait_rounds(1)
        assert _leaves(v2.endpoint, f"/rdzv/{run_id}/w")
        for p in procs:
            p.kill()
        # lease_ttl 2 s: node keys go in ~2 s, the state document within run_ttl = 6 s.
        wait_until(lambda: _leaves(v2.endpoint, f"/rdzv/{run_id}") == [], 20,
                   "the crashed run's keys to expire")
    finally:
        for p in procs:
            p.stop()


@contextmanager
def _pair(server: EtcdServer, tag: str) -> Iterator[tuple[str, list]]:
    """Two nodes that formed round 1; shut down afterwards."""
    run_id = new_run_id(tag)
    with node_group("etcd-v2", server.endpoint, run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        g.join_all(nodes)
        yield run_id, nodes


def test_refreshed_keys_outlive_their_ttl(v2: EtcdServer) -> None:
    with _pair(v2, "alive") as (run_id, nodes):
        time.sleep(7)  # > run_ttl (6 s) and > lease_ttl: only refreshes keep them
        keys = _leaves(v2.endpoint, f"/rdzv/{run_id}/w")
        assert f"/rdzv/{run_id}/w/ctl/state" in keys
        assert sum("/w/node/" in k for k in keys) == 2
        assert [n.num_nodes_waiting() for n in nodes] == [0, 0]


def test_round_store(v2: EtcdServer) -> None:
    settings = parse_settings(_params(v2.endpoint))
    client = EtcdV2Client.shared(settings)
    try:
        store = EtcdV2Store(client, f"/rdzv-store-test/{new_run_id()}", ttl=60, timeout=5)
        store.set("a/b c", b"\x00\xff")
        assert store.get("a/b c") == b"\x00\xff"
        assert store.add("n", 2) == 2 and store.add("n", 3) == 5
        assert store.compare_set("x", "", "1") == b"1"
        assert store.compare_set("x", "0", "2") == b"1"
        assert store.compare_set("x", "1", "2") == b"2"
        assert store.compare_set("missing", "e", "d") == b"e"
        store.multi_set(["m1", "m2"], ["v1", "v2"])
        assert store.multi_get(["m1", "m2"]) == [b"v1", b"v2"]
        assert store.check(["a/b c", "m1"]) and not store.check(["nope"])
        assert store.num_keys() == 5
        assert store.delete_key("m2") and not store.delete_key("m2")
        threading.Timer(0.5, lambda: store.set("late", "here")).start()
        start = time.monotonic()
        assert store.get("late") == b"here"  # woken by the watch, not after the timeout
        assert time.monotonic() - start < 4
        with pytest.raises(DistStoreError, match="timed out after 0.5 s"):
            store.wait(["never"], timedelta(seconds=0.5))
    finally:
        client.close()


def test_round_store_counter_and_timeout_errors(v2: EtcdServer) -> None:
    client = EtcdV2Client.shared(parse_settings(_params(v2.endpoint)))
    try:
        store = EtcdV2Store(client, f"/rdzv-store-test/{new_run_id()}", ttl=60, timeout=5)
        store.set("c", "x")
        with pytest.raises(DistStoreError, match=r"add\('c'\): the value is not an integer: b'x'"):
            store.add("c", 1)
        with pytest.raises(DistStoreError, match=r"timed out after 0.5 s waiting for 2 key\(s\): n1, n2$"):
            store.wait(["n2", "n1"], timedelta(seconds=0.5))
    finally:
        client.close()


def test_round_store_wait_rereads_when_the_event_history_moved_on(
    v2: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = EtcdV2Client.shared(parse_settings(_params(v2.endpoint)))
    try:
        store = EtcdV2Store(client, f"/rdzv-store-test/{new_run_id()}", ttl=60, timeout=5)
        real_watch = client.watch
        polls: list[object] = []

        def history_gone(*args: object, **kwargs: object) -> object:
            polls.append(args)
            if len(polls) == 1:  # the key is written while etcd's history moves past the wait
                store.set("late", "here")
                raise etcd.EtcdEventIndexCleared("The event in requested index is outdated")
            return real_watch(*args, **kwargs)

        monkeypatch.setattr(client, "watch", history_gone)
        assert store.get("late") == b"here"
        assert len(polls) == 1  # found by the re-read, not by a later event
    finally:
        client.close()


def test_feed_recovers_when_the_event_history_moved_on(v2: EtcdServer) -> None:
    with _pair(v2, "history") as (run_id, nodes):
        backend = nodes[0].backend
        _, old = backend.read_nodes()
        for i in range(1100):  # v2 keeps the last 1000 events
            backend.client.write(f"/rdzv-noise/{run_id}", str(i))
        feed = backend.watch(old, Control(), nodes=True)
        try:
            changes = None
            deadline = time.monotonic() + 10
            while not changes and time.monotonic() < deadline:
                changes = feed.poll(1)
            assert {c.node_id for c in changes} == {n.node_id for n in nodes}
            assert feed.control.sealed is not None and feed.control.sealed.round == 1
        finally:
            feed.close()


def test_failover_to_the_next_endpoint(v2: EtcdServer) -> None:
    with node_group("etcd-v2", f"127.0.0.1:1,{v2.endpoint}") as g:
        assert [i.world_size for i in g.join_all([g.node(1, 1)])] == [1]


@pytest.mark.parametrize("version", VERSIONS)
def test_tls(version: str, certs) -> None:
    server = _start(version, certs=certs)
    try:
        tls = {"cacert": str(certs.ca_cert), "cert": str(certs.client_cert), "key": str(certs.client_key)}
        endpoint = f"https://{server.endpoint}"
        with node_group("etcd-v2", endpoint, **tls) as g:
            assert g.join_all([g.node(1, 1)])[0].world_size == 1
        # torch's spellings work too
        torch_tls = {"ca_cert": tls["cacert"], "ssl_cert": tls["cert"], "ssl_cert_key": tls["key"]}
        with node_group("etcd-v2", endpoint, **torch_tls) as g:
            assert g.join_all([g.node(1, 1)])[0].world_size == 1
        with pytest.raises(RendezvousConnectionError, match=server.endpoint):
            create_handler(_params(endpoint, cacert=tls["cacert"]))  # no client certificate
    finally:
        server.stop()


def test_basic_auth(v2: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    base = v2.client_urls[0]

    def call(method: str, path: str, body: dict | None = None, auth: str | None = None) -> None:
        req = urllib.request.Request(base + path, method=method,
                                     data=json.dumps(body).encode() if body else None)
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        urllib.request.urlopen(req, timeout=5).read()

    # v2 has its own auth store (etcdctl's v3 users do not apply to /v2/keys).
    call("PUT", "/v2/auth/users/root", {"user": "root", "password": "rootpw"})
    call("PUT", "/v2/auth/enable", auth="root:rootpw")
    try:
        # With auth on, v2 lets the guest role do nothing: only root may write.
        call("PUT", "/v2/auth/roles/guest", {"role": "guest", "revoke": {"kv": {
            "read": ["/*"], "write": ["/*"]}}}, auth="root:rootpw")
        monkeypatch.setenv("RDZV_ETCD_PASSWORD", "rootpw")
        with node_group("etcd-v2", v2.endpoint, user="root") as g:
            assert g.join_all([g.node(1, 1)])[0].world_size == 1
        monkeypatch.setenv("RDZV_ETCD_PASSWORD", "wrong")
        with pytest.raises(RendezvousConnectionError, match="authentication"):
            create_handler(_params(v2.endpoint, user="root"))
    finally:
        call("DELETE", "/v2/auth/enable", auth="root:rootpw")
