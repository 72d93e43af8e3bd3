"""etcd-specific behaviour of the v3 handler: key hygiene, the store, TLS/auth, failover, cost."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from rdzv_testlib import FAST_CONF, NodeProcess, new_run_id, node_group
from torch.distributed import DistStoreError, PrefixStore
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters
from waiting import wait_until

from rdzv import create_handler
from rdzv.backends.etcd_v3.store import EtcdStore
from rdzv.etcd import EtcdClient


def _keys(endpoint: str, prefix: str) -> list[str]:
    client = EtcdClient(endpoint)
    try:
        return [kv.key.decode() for kv in client.range(prefix, prefix=True, keys_only=True).kvs]
    finally:
        client.close()


def test_no_keys_left_after_a_clean_end(etcd) -> None:
    run_id = new_run_id("clean")
    with node_group("etcd", etcd.endpoint, run_id) as g:
        nodes = [g.node(2, 2) for _ in range(2)]
        infos = g.join_all(nodes)
        infos[0].store.set("k", "v")
        assert _keys(etcd.endpoint, f"/rdzv/{run_id}/"), "a running job has keys"
    assert _keys(etcd.endpoint, f"/rdzv/{run_id}/") == []


def _four_finish_together(endpoint: str, run_id: str, client: EtcdClient) -> int:
    """Four members form a round, then all shut down at once (a job's end); returns the revision
    from which to watch what their end wrote."""
    with node_group("etcd", endpoint, run_id) as g:
        nodes = [g.node(4, 4) for _ in range(4)]
        g.join_all(nodes)
        start = client.range(f"/rdzv/{run_id}/").revision + 1
        for future in [g.pool.submit(node.shutdown) for node in nodes]:
            assert future.result(timeout=60)
    return start


def test_the_close_is_written_once_whatever_the_number_of_members(etcd) -> None:
    # Every member closes the run on its way out; each write of ctl/closed would reach every
    # member's watch of ctl/ (N^2 events for a job's end). One put, however many close.
    run_id = new_run_id("close")
    client = EtcdClient(etcd.endpoint)
    try:
        closed_key = f"/rdzv/{run_id}/ctl/closed"
        start = _four_finish_together(etcd.endpoint, run_id, client)
        # The last node out deleted the run: its history ends with that delete.
        events: list = []
        with client.watch(closed_key, start_revision=start) as watch:
            while not any(e.type == "DELETE" for e in events):
                batch = watch.get(10)
                assert batch, f"no delete of {closed_key} after {events}"
                events += batch
        assert [e.type for e in events].count("PUT") == 1, events
    finally:
        client.close()


def test_finishing_members_send_the_others_no_departures(etcd) -> None:
    # At a clean end every member revokes its lease; members watch the deletes of the round's
    # live keys, so each would be sent every other's (N^2 for a job's end). A finished member
    # moves its live key to the run lease first: the keys go once, with the run.
    run_id = new_run_id("finish")
    client = EtcdClient(etcd.endpoint)
    try:
        live = f"/rdzv/{run_id}/round/"
        start = _four_finish_together(etcd.endpoint, run_id, client)
        with client.watch(live, prefix=True, start_revision=start, filters=("noput",)) as watch:
            deletes: list = []
            while not deletes or client.range(f"/rdzv/{run_id}/", prefix=True, count_only=True).count:
                batch = watch.get(5)
                assert batch is not None or deletes, "the run's keys were never removed"
                deletes += [e for e in batch or [] if b"/live/" in e.kv.key]
        assert len(deletes) == 4, deletes
        assert len({e.kv.mod_revision for e in deletes}) == 1, "a live key went before the run"
    finally:
        client.close()


def test_crashed_job_keys_expire(etcd) -> None:
    run_id = new_run_id("crash")
    procs = [NodeProcess("etcd", etcd.endpoint, run_id, 2, 2) for _ in range(2)]
    try:
        for p in procs:
            p.wait_rounds(1)
        assert _keys(etcd.endpoint, f"/rdzv/{run_id}/")
        for p in procs:
            p.kill()
        # lease_ttl is 2 s: node keys and the run lease's keys go within a few seconds.
        wait_until(lambda: _keys(etcd.endpoint, f"/rdzv/{run_id}/") == [], 15, "the crashed run's keys to expire")
    finally:
        for p in procs:
            p.stop()


def test_custom_prefix_keeps_every_key_below_it(etcd) -> None:
    run_id = new_run_id("prefix")
    with node_group("etcd", etcd.endpoint, run_id, prefix="/teams/a/rdzv") as g:
        g.join_all([g.node(1, 1)])
        keys = _keys(etcd.endpoint, "/")
        mine = [k for k in keys if run_id in k]
        assert mine and all(k.startswith(f"/teams/a/rdzv/{run_id}/") for k in mine)


def test_store_operations(etcd) -> None:
    client = EtcdClient(etcd.endpoint)
    try:
        prefix = f"/rdzv-store-test/{new_run_id()}/"
        store = EtcdStore(client, prefix, timeout=5)
        store.set("a", "1")
        assert store.get("a") == b"1"
        assert store.add("n", 2) == 2 and store.add("n", 3) == 5
        assert store.compare_set("a", "1", "2") == b"2"
        assert store.compare_set("a", "1", "3") == b"2"
        assert store.compare_set("new", "", "x") == b"x"
        assert store.check(["a", "n"]) and not store.check(["missing"])
        store.multi_set(["m1", "m2"], ["v1", "v2"])
        assert store.multi_get(["m1", "m2"]) == [b"v1", b"v2"]
        assert store.num_keys() == 5
        assert store.delete_key("a") and not store.delete_key("a")

        # get blocks until another writer sets the key (watch, not polling)
        threading.Timer(0.3, lambda: store.set("late", "here")).start()
        assert store.get("late") == b"here"

        # a bounded wait that names what it waited for
        start = time.monotonic()
        with pytest.raises(DistStoreError, match="never"):
            store.wait(["never"], timedelta(seconds=0.5))
        assert time.monotonic() - start < 5

        # torch wraps it in a PrefixStore for the agent; that path must work too
        scoped = PrefixStore("torch.rendezvous.x.1", store)
        scoped.set("k", "v")
        assert scoped.get("k") == b"v"
        assert scoped.multi_get(["k"]) == [b"v"]
        assert scoped.add("c", 1) == 1
        client.delete(prefix, prefix=True)
    finally:
        client.close()


def test_store_counter_adders_do_not_contend_and_agree(etcd) -> None:
    # N agents add to one counter at once (the exit barrier): each gets a distinct running
    # total 1..N, and each add is one request, never retried for contention.
    client = EtcdClient(etcd.endpoint)
    prefix = f"/rdzv-store-test/{new_run_id()}/"
    try:
        store = EtcdStore(client, prefix, timeout=5)
        adders = 32
        client.range(prefix)  # connected before counting
        requests = etcd.member.unary_requests()
        with ThreadPoolExecutor(adders) as pool:
            totals = list(pool.map(lambda _: store.add("barrier", 1), range(adders)))
        assert sorted(totals) == list(range(1, adders + 1))
        # One request per add: none read first, none retried because another adder came first.
        assert etcd.member.unary_requests() - requests == adders
        assert store.get("barrier") == str(adders).encode()
        assert store.check(["barrier"]) and store.num_keys() == 1

        # Other amounts, a set that starts the counter afresh, a compare on its value.
        assert store.add("barrier", 5) == adders + 5 and store.add("barrier", -2) == adders + 3
        store.set("barrier", "10")
        assert store.get("barrier") == b"10" and store.add("barrier", 1) == 11
        assert store.compare_set("barrier", "11", "20") == b"20" and store.add("barrier", 1) == 21
        assert store.multi_get(["barrier"]) == [b"21"]

        # A wait sees the counter's value, not the base its first add wrote.
        threading.Timer(0.3, lambda: (store.add("late", 1), store.add("late", 1))).start()
        store.wait(["late"])
        assert store.get("late") in (b"1", b"2")
        assert store.delete_key("barrier") and not store.check(["barrier"])
        assert store.add("barrier", 1) == 1
    finally:
        client.delete(prefix, prefix=True)
        client.close()


def test_store_counter_and_timeout_errors(etcd) -> None:
    client = EtcdClient(etcd.endpoint)
    try:
        prefix = f"/rdzv-store-test/{new_run_id()}/"
        store = EtcdStore(client, prefix, timeout=5)
        store.set("c", "x")
        with pytest.raises(DistStoreError, match=r"add\('c'\): the value is not an integer: b'x'"):
            store.add("c", 1)
        missing = [f"k{i}" for i in range(7)]
        shown = r"key\(s\) k0, k1, k2, k3, k4 and 2 more$"
        with pytest.raises(DistStoreError, match=f"timed out after 0.5 s waiting for {shown}"):
            store.wait(missing[::-1], timedelta(seconds=0.5))
        client.delete(prefix, prefix=True)
    finally:
        client.close()


def test_agent_rank_assignment_runs_on_the_round_store(etcd) -> None:
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent, WorkerSpec

    with node_group("etcd", etcd.endpoint) as g:
        nodes = [g.node(3, 3) for _ in range(3)]
        infos = g.join_all(nodes)
        spec = WorkerSpec(role="trainer", local_world_size=2, rdzv_handler=nodes[0], entrypoint="x")

        def assign(info):  # noqa: ANN001, ANN202
            return SimpleElasticAgent._assign_worker_ranks(
                None, info.store, info.rank, info.world_size, spec  # type: ignore[arg-type]
            )

        results = list(g.pool.map(assign, infos))
        global_ranks = sorted(w.global_rank for ws in results for w in ws)
        assert global_ranks == list(range(6))


def test_tls_with_client_certificate(etcd_tls) -> None:
    certs = etcd_tls.certs
    with node_group("etcd", f"https://{etcd_tls.endpoint}", cacert=certs.ca_cert, cert=certs.client_cert,
                    key=certs.client_key) as g:
        assert g.join_all([g.node(1, 1)])[0].world_size == 1


def test_tls_with_untrusted_ca_is_a_clear_error(etcd_tls) -> None:
    certs = etcd_tls.certs
    params = RendezvousParameters("etcd", f"https://{etcd_tls.endpoint}", new_run_id(), 1, 1,
                                  cacert=certs.other_ca_cert, cert=certs.client_cert, key=certs.client_key,
                                  read_timeout="3")
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=etcd_tls.endpoint):
        create_handler(params)
    assert time.monotonic() - start < 10


def test_user_password_auth(etcd_auth, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDZV_ETCD_PASSWORD", etcd_auth.password)
    with node_group("etcd", etcd_auth.endpoint, user=etcd_auth.user, prefix=etcd_auth.prefix.rstrip("/")) as g:
        assert g.join_all([g.node(1, 1)])[0].world_size == 1


def test_wrong_password_is_a_clear_error(etcd_auth, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDZV_ETCD_PASSWORD", "not-the-password")
    params = RendezvousParameters("etcd", etcd_auth.endpoint, new_run_id(), 1, 1, user=etcd_auth.user,
                                  read_timeout="3")
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as err:
        create_handler(params)
    assert time.monotonic() - start < 10
    assert "not-the-password" not in str(err.value)


def test_password_on_the_command_line_is_refused(etcd) -> None:
    params = RendezvousParameters("etcd", etcd.endpoint, new_run_id(), 1, 1, user="u", password="p")
    with pytest.raises(ValueError, match="RDZV_ETCD_PASSWORD"):
        create_handler(params)


def test_formation_survives_the_loss_of_the_member_in_use(etcd_cluster) -> None:
    endpoint = ",".join(etcd_cluster.endpoints)
    run_id = new_run_id("failover")
    with node_group("etcd", endpoint, run_id) as g:
        nodes = [g.node(3, 3) for _ in range(2)]
        futures = [g.join(n) for n in nodes]
        wait_until(lambda: nodes[0].backend.count_nodes() == 2, 10, "both nodes to announce")
        etcd_cluster.members[0].kill()  # the first endpoint: the one every client starts on
        late = g.node(3, 3)
        futures.append(g.join(late))
        infos = [f.result(timeout=60) for f in futures]
        assert sorted(i.rank for i in infos) == [0, 1, 2]


def test_leader_loss_during_formation(etcd_cluster) -> None:
    endpoint = ",".join(etcd_cluster.endpoints)
    with node_group("etcd", endpoint) as g:
        nodes = [g.node(3, 3) for _ in range(2)]
        futures = [g.join(n) for n in nodes]
        wait_until(lambda: nodes[0].backend.count_nodes() == 2, 10, "both nodes to announce")
        etcd_cluster.wait_leader().kill()
        futures.append(g.join(g.node(3, 3)))
        assert sorted(f.result(timeout=60).rank for f in futures) == [0, 1, 2]


def test_num_nodes_waiting_makes_no_requests(etcd) -> None:
    """The agent polls it (and is_closed) every 0.1 s on every node: both must be answered
    locally. Counted at the server: every unary request of any kind, from any client."""
    with node_group("etcd", etcd.endpoint) as g:
        a = g.node(1, 1)
        g.join_all([a])
        a.num_nodes_waiting()  # the first call may open what later calls read
        a.is_closed()
        before = etcd.member.unary_requests()
        for _ in range(100):
            a.num_nodes_waiting()
            a.is_closed()
        assert etcd.member.unary_requests() == before


_ = (os, FAST_CONF)


def test_a_round_too_big_for_one_record_is_refused_unwritten(etcd_v2, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that keeps a round in one record (etcd v2 here): a record nobody could read
    would mark the run corrupt, so the coordinator refuses it before writing, naming the limit
    (lowered here so that 3 nodes exceed it)."""
    from rdzv.rendezvous import join_errors, sealing

    monkeypatch.setattr(sealing, "MAX_ROUND_RECORD", 300)
    monkeypatch.setattr(join_errors, "MAX_ROUND_RECORD", 300)
    run_id = new_run_id("big")
    with node_group("etcd-v2", etcd_v2.endpoint, run_id, join_timeout="8") as g:
        nodes = [g.node(3, 3, local_addr=f"{'h' * 80}{i}") for i in range(3)]
        futures = [g.join(n) for n in nodes]
        refused = []
        for future in futures:
            with pytest.raises(Exception) as caught:  # noqa: B017 - the coordinator's, or others' timeout
                future.result(timeout=60)
            refused.append(str(caught.value))
    # The coordinator names the limit; it closed the run, so the others stopped with it.
    assert sum("MiB limit a sealed record may have; the round was not written" in m for m in refused) == 1, refused
    assert all("closed" in m for m in refused), refused


def test_etcd_v3_has_no_record_size_ceiling(etcd34, monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd v3 stores a round as a constant-size header plus one key per member: the same
    round (over the lowered limit) forms, every node learns its rank from its own key, and the
    header names no member beyond the first ranks."""
    from rdzv.rendezvous import join_errors, sealing

    monkeypatch.setattr(sealing, "MAX_ROUND_RECORD", 300)
    monkeypatch.setattr(join_errors, "MAX_ROUND_RECORD", 300)
    run_id = new_run_id("big")
    with node_group("etcd", etcd34.endpoint, run_id) as g:
        nodes = [g.node(3, 3, local_addr=f"{'h' * 80}{i}") for i in range(3)]
        infos = g.join_all(nodes)
        assert sorted(i.rank for i in infos) == [0, 1, 2]
        client = EtcdClient(etcd34.endpoint)
        try:
            header = client.get(f"/rdzv/{run_id}/ctl/current")
            # Only rank 0's address (the master's) is in it, not the members' hosts.
            assert header is not None and len(header.value) < 300 and header.value.count(b"h" * 80) == 1
        finally:
            client.close()
        assert len(_keys(etcd34.endpoint, f"/rdzv/{run_id}/round/000000000001/rank/")) == 3
        assert len(_keys(etcd34.endpoint, f"/rdzv/{run_id}/round/000000000001/live/")) == 3


def test_no_write_of_a_65536_node_round_nears_etcds_request_limit() -> None:
    """What the etcd v3 coordinator writes for a round of 65,536 nodes with 64-character host
    names: a header the size of a 2-node round's, and member keys in batches far below etcd's
    default request limit (1.5 MiB), whatever N is. The same round listed in one record would
    not fit (the backends that keep one refuse it before writing)."""
    from rdzv.backends.etcd_v3.seal import TXN_OPS
    from rdzv.layouts import EtcdV3Layout
    from rdzv.rendezvous.decoding import MAX_ROUND_RECORD
    from rdzv.rendezvous.records import RoundRecord

    def record(n: int) -> RoundRecord:
        ids = [f"{i:010x}" for i in range(n)]
        hosts = [f"{i:05d}".rjust(64, "h") for i in range(n)]
        return RoundRecord.listing(
            ids, hosts, round=123456, master_addr=hosts[0], master_port=29500, min_nodes=n, max_nodes=n
        )

    big, small = record(65536), record(2)
    assert len(big.encode_header()) - len(small.encode_header()) <= 12  # the digits of 65536 vs 2, three times
    keys = EtcdV3Layout("/rdzv/" + "r" * 64)
    batch = [
        len(keys.live(big.round) + node_id) + len(a.encode()) + 16  # + the op's framing
        for node_id, a in list(big.assignments().items())[-TXN_OPS:]
    ]
    assert sum(batch) < 64 * 1024 < 1536 * 1024
    assert len(big.encode()) > MAX_ROUND_RECORD


def test_a_waiting_node_whose_lease_lapsed_announces_again(etcd34) -> None:
    """A node waiting for a seal whose lease lapsed (keep-alives unanswered past the TTL on an
    overloaded box) lost its record with it: the coordinator no longer counts it. It must
    announce again on a new lease instead of waiting for a seal that cannot come."""
    with node_group("etcd", etcd34.endpoint) as g:
        a, b = g.node(3, 3), g.node(3, 3)
        fa = g.join(a)
        wait_until(lambda: a.rendezvous._membership is None and a.backend.count_nodes() == 1, 30, "a coordinating")  # type: ignore[attr-defined]
        fb = g.join(b)
        wait_until(lambda: a.backend.count_nodes() == 2, 30, "b's announce")  # type: ignore[attr-defined]
        lease = b.backend._session.lease_id  # type: ignore[attr-defined]
        with EtcdClient(etcd34.endpoint) as client:
            client.lease_revoke(lease)
        wait_until(lambda: b.backend.session_lost(), 30, "b to learn its lease is gone")  # type: ignore[attr-defined]
        c = g.node(3, 3)
        infos = [f.result(timeout=60) for f in (fa, fb, g.join(c))]
        assert sorted(i.rank for i in infos) == [0, 1, 2]
        assert b.backend._session.lease_id != lease  # type: ignore[attr-defined]
