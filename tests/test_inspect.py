"""`rdzv status`/`rdzv clean` data: what an operator sees of the runs on an etcd."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launcher_helpers import clean_env
from rdzv_testlib import new_run_id, node_group

from rdzv import inspect
from rdzv.etcd import EtcdClient
from rdzv.rendezvous.records import NodeInfo


def test_describe_list_and_clean(etcd) -> None:
    run_id = new_run_id("ops")
    with node_group("etcd", etcd.endpoint, run_id, local_world_size="4") as g:
        nodes = [g.node(1, 2) for _ in range(3)]
        g.join_all(nodes[:2])
        spare = g.join(nodes[2])
        info = inspect.describe_run(etcd.endpoint, run_id)
        assert info["round"] == 1 and info["world_size"] == 2 and not info["closed"]
        assert sorted(m["node_rank"] for m in info["members"]) == [0, 1]
        assert all(m["local_world_size"] == 4 and m["lease_ttl_left"] > 0 for m in info["members"])
        assert len(info["spares"]) + len(info["waiting"]) <= 1
        assert run_id in {r["run_id"] for r in inspect.list_runs(etcd.endpoint)}
        with pytest.raises(RuntimeError, match="live node"):
            inspect.clean_run(etcd.endpoint, run_id)
        nodes[0].set_closed()
        with pytest.raises(Exception):  # noqa: B017 - the spare exits (graceful) once closed
            spare.result(timeout=10)
        assert inspect.describe_run(etcd.endpoint, run_id)["closed"]
    with pytest.raises(inspect.RunNotFound):  # a clean end leaves no key: no run
        inspect.describe_run(etcd.endpoint, run_id)
    assert inspect.clean_run(etcd.endpoint, run_id) == 0


def _put(endpoint: str, key: str, value: bytes) -> None:
    with EtcdClient(endpoint) as client:
        client.put(key, value)


def _ops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher.ops", *args], capture_output=True, text=True,
                          env=clean_env(), timeout=60)


def test_a_corrupt_run_is_flagged_and_the_others_still_listed(etcd) -> None:
    good, bad = new_run_id("good"), new_run_id("bad")
    root = f"/rdzv/{bad}/"
    garbage = {
        root + "ctl/current": b"{not json",
        root + "ctl/coord/notanumber": b"x",
        root + "ctl/lease": b"zz",
        root + "node/zzzzzz": b"\xff garbage",
        # valid JSON but no node record, and a record of another node under this one's name
        root + "node/yyyyyy": b'{"v": 1, "node_id": "yyyyyy"}',
        root + "node/xxxxxx": NodeInfo("wwwwww", "h", "a", 1, 2, 1).encode(),
    }
    for key, value in garbage.items():
        _put(etcd.endpoint, key, value)
    with node_group("etcd", etcd.endpoint, good) as g:
        g.join_all([g.node(1, 1)])
        runs = {r["run_id"]: r for r in inspect.list_runs(etcd.endpoint)}
        assert runs[good]["corrupt"] == [] and len(runs[good]["members"]) == 1
        flagged = runs[bad]["corrupt"]
        assert sorted(line.split(" ", 1)[0] for line in flagged) == sorted(garbage), flagged
        info = inspect.describe_run(etcd.endpoint, bad)
        assert info["members"] == info["waiting"] == info["spares"] == [], "garbage is no node"
        assert info["round"] == 0 and info["keys"] == len(garbage)
        # The CLI: a table over every run (with the CORRUPT count), and one run in detail.
        table = _ops("status", "--rdzv-endpoint", etcd.endpoint)
        assert table.returncode == 0 and "CORRUPT" in table.stdout.splitlines()[0], table.stderr
        row = next(line.split() for line in table.stdout.splitlines() if line.startswith(bad))
        assert str(len(garbage)) in row
        detail = _ops("status", "--rdzv-endpoint", etcd.endpoint, "--rdzv-id", bad)
        assert detail.returncode == 0 and f"{root}ctl/current (not JSON" in detail.stdout, detail
        # clean: undecodable node records are no live nodes; the good run's node is one.
        assert inspect.clean_run(etcd.endpoint, bad) == len(garbage)
        with pytest.raises(RuntimeError, match="1 live node"):
            inspect.clean_run(etcd.endpoint, good)


def test_status_of_an_unknown_run_fails_in_one_line(etcd35) -> None:
    proc = _ops("status", "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", "nosuchrun")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"rdzv: error: no run 'nosuchrun' under /rdzv at {etcd35.endpoint}\n"
    with pytest.raises(inspect.RunNotFound):
        inspect.describe_run(etcd35.endpoint, "nosuchrun")
