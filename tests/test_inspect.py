"""`rdzv status`/`rdzv clean` data: what an operator sees of the runs on an etcd."""

from __future__ import annotations

import pytest
from rdzv_testlib import new_run_id, node_group

from rdzv import inspect


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
    assert inspect.describe_run(etcd.endpoint, run_id)["keys"] == 0
    assert inspect.clean_run(etcd.endpoint, run_id) == 0
