"""A store that is slow at start is not a dead store (issue 21).

Real rdzv-launch nodes, one store of their own per test: node A starts and waits for its peer,
then the store stops answering (etcd SIGSTOPped: it accepts connections and answers nothing, as
in a leader election, a long fsync or a GC pause; for c10d, the node hosting the TCPStore is
frozen), node B starts during the stall, and the store answers again. B must wait for the store,
say so in one line, and both must form, train and exit 0, leaving no key. A stall that outlasts
join_timeout ends both nodes with one line naming the endpoint. A refused connection still
fails fast (tests/test_rendezvous_conformance.py, tests/test_launcher_cli.py).
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from etcd_harness import EtcdHarnessError, EtcdServer, free_port
from launcher_helpers import Launcher, launchers, records, write_script
from waiting import wait_until

from rdzv.etcd import EtcdClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STALL = 20.0  # seconds etcd is silent in the first test, as in issue 21

WORKER = """
import os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
t = torch.ones(1)
dist.all_reduce(t)
with open(os.path.join(sys.argv[1], f"0_{dist.get_rank()}.json"), "w") as f:
    f.write('{"sum": %d}' % int(t.item()))
dist.destroy_process_group()
"""


@pytest.fixture(params=["etcd", "etcd-v2"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[str, EtcdServer]]:
    """(backend, an etcd 3.4 member of its own): these tests stall it."""
    try:
        server = EtcdServer("3.4", enable_v2=request.param == "etcd-v2").start()
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield request.param, server
    finally:
        server.stop()


def _args(backend: str, endpoint: str, run_id: str, script: Path, out: Path, conf: str) -> list[str]:
    return [
        "--nnodes=2", "--nproc-per-node=1", f"--rdzv-backend={backend}",
        f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", f"--rdzv-conf={conf}",
        "--local-addr=127.0.0.1", str(script), str(out),
    ]  # fmt: skip


def _keys_left(backend: str, endpoint: str, run_id: str) -> list[str]:
    if backend == "etcd":
        with EtcdClient(endpoint) as client:
            return [kv.key.decode() for kv in client.range(f"/rdzv/{run_id}/", prefix=True).kvs]
    try:
        with urllib.request.urlopen(f"http://{endpoint}/v2/keys/rdzv/{run_id}?recursive=true", timeout=5) as r:
            tree = json.load(r)["node"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise
    leaves: list[str] = []

    def walk(node: dict) -> None:
        if node.get("dir"):
            for child in node.get("nodes", []):
                walk(child)
        else:
            leaves.append(node["key"])

    walk(tree)
    return leaves


def _waiting(node: Launcher) -> Callable[[], bool]:
    return lambda: "waiting for nodes" in node.stderr


def _not_answering(node: Launcher) -> Callable[[], bool]:
    return lambda: "not answering for" in node.stderr


def test_node_started_during_an_etcd_stall_waits_and_forms(store: tuple[str, EtcdServer], tmp_path: Path) -> None:
    backend, server = store
    script = write_script(tmp_path, "worker.py", WORKER)
    run_id = f"stall-{uuid.uuid4().hex[:8]}"
    args = _args(backend, server.endpoint, run_id, script, tmp_path, "lease_ttl=5,read_timeout=10")
    with launchers(tmp_path) as start:
        a = start(args)
        wait_until(_waiting(a), 60, "node A waiting for its peer", a.describe)
        server.member.pause()
        paused = time.monotonic()
        try:
            b = start(args)
            # B tries, finds etcd silent and says it waits (after its connect timeout).
            wait_until(_not_answering(b), 60, "node B saying etcd does not answer", b.describe)
            # The outage goes on, as in the issue (20 s): past B's lease_ttl and gRPC's
            # keepalive, so nothing may stay wedged on a connection opened during it.
            time.sleep(max(0.0, STALL - (time.monotonic() - paused)))
            assert b.proc.poll() is None, b.describe()
        finally:
            server.member.resume()
        back = time.monotonic()
        for node in (a, b):
            assert node.wait(60) == 0, node.describe()
        took = time.monotonic() - back
    print(f"[figure] start during a stall ({backend}): both nodes done {took:.1f} s after etcd answered again")
    assert took < 30, f"{took:.1f} s after etcd was back"
    assert {r["sum"] for r in records(tmp_path).values()} == {2} and len(records(tmp_path)) == 2
    lines = [line for line in b.stderr.splitlines() if "not answering for" in line]
    assert len(lines) == 1, b.stderr  # said once, not once per retry
    assert server.endpoint in lines[0]
    assert _keys_left(backend, server.endpoint, run_id) == []


def test_stall_past_join_timeout_ends_both_nodes_with_one_line(store: tuple[str, EtcdServer], tmp_path: Path) -> None:
    backend, server = store
    script = write_script(tmp_path, "worker.py", WORKER)
    run_id = f"stall-{uuid.uuid4().hex[:8]}"
    conf = "lease_ttl=5,read_timeout=5,join_timeout=20"
    args = _args(backend, server.endpoint, run_id, script, tmp_path, conf)
    with launchers(tmp_path) as start:
        a = start(args)
        wait_until(_waiting(a), 60, "node A waiting for its peer", a.describe)
        server.member.pause()
        try:
            b = start(args)
            for node in (a, b):
                assert node.wait(90) != 0, node.describe()
        finally:
            server.member.resume()
    for node in (a, b):
        errors = [line for line in node.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, node.stderr
        assert server.endpoint in errors[0], errors[0]
        # The waiting node times out its join, the starting one its wait for etcd: both say
        # that etcd is silent, and for how long.
        assert re.search(r"not answering for \d+ s", errors[0]), errors[0]
        assert "join_timeout" in errors[0] or "did not complete within 20 s" in errors[0], errors[0]
        assert "Traceback" not in node.stderr, node.stderr
    # Nothing of theirs is left running (launchers() killed nothing: they had exited).
    assert a.proc.poll() is not None and b.proc.poll() is not None
    # What they wrote goes with their leases once etcd runs again.
    wait_until(lambda: _keys_left(backend, server.endpoint, run_id) == [], 30, "the run's keys to expire")


def test_node_started_while_the_c10d_host_is_frozen_waits_and_forms(tmp_path: Path) -> None:
    """c10d: the store lives in node A's launcher. Frozen (SIGSTOP), its port accepts
    connections and answers nothing: B waits for it instead of failing."""
    script = write_script(tmp_path, "worker.py", WORKER)
    endpoint = f"127.0.0.1:{free_port()}"
    args = _args("c10d", endpoint, f"stall-{uuid.uuid4().hex[:8]}", script, tmp_path, "read_timeout=5")
    with launchers(tmp_path) as start:
        a = start(args)
        wait_until(_waiting(a), 60, "node A (the store's host) waiting for its peer", a.describe)
        a.signal(signal.SIGSTOP)
        try:
            b = start(args)
            wait_until(_not_answering(b), 60, "node B saying the store does not answer", b.describe)
            assert b.proc.poll() is None, b.describe()
        finally:
            a.signal(signal.SIGCONT)
        for node in (a, b):
            assert node.wait(60) == 0, node.describe()
    assert {r["sum"] for r in records(tmp_path).values()} == {2} and len(records(tmp_path)) == 2
