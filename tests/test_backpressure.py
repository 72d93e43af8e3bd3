"""etcd's backpressure is never fatal (issue 17 item 1).

A real etcd 3.4 behind the fault proxy (tests/etcd_fault_proxy.py), which answers a chosen share
of requests with etcd's own error texts: 'too many requests' (as etcd 3.4 sends it, UNKNOWN, and
as RESOURCE_EXHAUSTED), no leader, leader changed, request timed out, NOSPACE. Nodes must form
anyway (seals and announces stay idempotent under retry), their first round-store write must
land, and a clean end must leave no key. Persistent NOSPACE ends a join at join_timeout naming
the remedy; an error that is no backpressure ('request is too large') is not retried.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

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
    EtcdStatus,
)
from etcd_harness import EtcdServer
from rdzv_testlib import new_run_id, node_group
from torch.distributed.elastic.rendezvous import RendezvousConnectionError
from waiting import wait_until

from rdzv.etcd import EtcdClient

pytestmark = pytest.mark.timeout(120)

WRITES_AND_READS = {"Txn", "Range", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke"}
NODES = 6


def _keys(server: EtcdServer, run_id: str) -> list[str]:
    with EtcdClient(server.endpoint) as client:
        return [kv.key.decode() for kv in client.range(f"/rdzv/{run_id}/", prefix=True).kvs]


def _answers(proxy: FaultProxy, method: str) -> int:
    stats = proxy.stats().get(method)
    return stats.responses if stats is not None else 0


@pytest.mark.parametrize(
    "error",
    [TOO_MANY_REQUESTS, TOO_MANY_REQUESTS_EXHAUSTED, NO_LEADER, LEADER_CHANGED, REQUEST_TIMEOUT, NO_SPACE],
    ids=["too-many-requests", "too-many-requests-exhausted", "no-leader", "leader-changed", "request-timed-out", "nospace"],
)
def test_formation_rides_out_backpressure(etcd_fault_proxy: FaultProxy, proxied_etcd: EtcdServer, error: EtcdStatus) -> None:
    run_id = new_run_id("busy")
    rule = etcd_fault_proxy.inject(WRITES_AND_READS, error=error, fraction=0.3, seed=7)
    with node_group("etcd", etcd_fault_proxy.endpoint, run_id) as g:
        nodes = [g.node(NODES, NODES) for _ in range(NODES)]
        infos = g.join_all(nodes)
        assert sorted(i.rank for i in infos) == list(range(NODES))
        # Every node's first write to the round's store lands (torch's agent does it next).
        with ThreadPoolExecutor(NODES) as pool:
            list(pool.map(lambda i: i.store.set(f"probe/{i.rank}", b"1"), infos))
        infos[0].store.set_timeout(timedelta(seconds=30))
        assert infos[0].store.get(f"probe/{NODES - 1}") == b"1"
    assert rule.fired > 0, etcd_fault_proxy.stats()
    # The last node out removed the run (through the same backpressure).
    assert _keys(proxied_etcd, run_id) == []


def test_backpressure_until_it_passes_is_one_line(
    etcd_fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Every announce turned away for a while: the join waits it out, says so once."""
    caplog.set_level(logging.WARNING, logger="rdzv")
    with node_group("etcd", etcd_fault_proxy.endpoint, read_timeout="1") as g:
        a, b = g.node(2, 2), g.node(2, 2)
        rule = etcd_fault_proxy.inject("Txn", error=TOO_MANY_REQUESTS, first_n=60)
        joined = [g.join(a), g.join(b)]
        wait_until(lambda: rule.fired >= 60, 60, "etcd to turn every Txn away for a while")
        infos = [f.result(timeout=60) for f in joined]
    assert sorted(i.rank for i in infos) == [0, 1]
    lines = [r.getMessage() for r in caplog.records if "too many requests" in r.getMessage()]
    assert lines and all(re.search(r"not answering for \d+ s, retrying until", line) for line in lines), lines
    assert len(lines) <= 2, lines  # one per node at most, not one per retry


def test_nospace_past_join_timeout_names_the_remedy(etcd_fault_proxy: FaultProxy) -> None:
    with node_group("etcd", etcd_fault_proxy.endpoint, read_timeout="1", join_timeout="3") as g:
        node = g.node(2, 2)
        etcd_fault_proxy.inject({"Txn", "Put"}, error=NO_SPACE)
        with pytest.raises(RendezvousConnectionError) as caught:
            node.next_rendezvous()
    message = str(caught.value)
    assert "past join_timeout (3 s)" in message, message
    assert "database space exceeded" in message and "compact" in message and "defragment" in message, message


def test_an_error_that_is_no_backpressure_is_not_retried(etcd_fault_proxy: FaultProxy) -> None:
    with node_group("etcd", etcd_fault_proxy.endpoint, join_timeout="60") as g:
        node = g.node(2, 2)
        rule = etcd_fault_proxy.inject("Txn", error=REQUEST_TOO_LARGE)
        started = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="request is too large"):
            node.next_rendezvous()
    assert rule.fired == 1
    assert time.monotonic() - started < 30  # not waited out until join_timeout


def test_a_silent_etcd_gets_no_burst_of_keep_alives(etcd_fault_proxy: FaultProxy) -> None:
    """While etcd is silent the keep-alive stream is kept (one endpoint: nowhere else to go)
    and no more than one keep-alive per lease waits in it; after, the lease is confirmed."""
    with EtcdClient(etcd_fault_proxy.endpoint, timeout=2) as client:
        lease = client.lease_grant(6)
        client.keep_alive(lease.id, lease.ttl, interval=0.5)
        wait_until(lambda: _answers(etcd_fault_proxy, "LeaseKeepAlive"), 10, "a first answer")
        opened = etcd_fault_proxy.stats()["LeaseKeepAlive"].seen
        etcd_fault_proxy.stall_all()
        try:
            wait_until(lambda: (client.lease_keeper.keep_alive_lag(lease.id) or 0) > 3, 10, "3 s of silence")
        finally:
            etcd_fault_proxy.resume()
        wait_until(lambda: client.lease_keeper.keep_alive_lag(lease.id) == 0.0, 10, "the lease confirmed")
        assert etcd_fault_proxy.stats()["LeaseKeepAlive"].seen == opened  # no stream re-opened
        client.lease_revoke(lease.id)
