"""torch's own elastic agent (and stock torchrun) running real gloo workers through our etcd handler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rdzv_testlib import ROOT, new_run_id

CONF = json.dumps({"lease_ttl": "3", "last_call_timeout": "1", "join_timeout": "60"})


def _check_ranks(out: Path, world: int) -> None:
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert sorted(int(r["RANK"]) for r in records) == list(range(world))
    assert {r["WORLD_SIZE"] for r in records} == {str(world)}
    assert {r["sum"] for r in records} == {float(sum(range(world)))}
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in records}) == 1
    assert {r["GROUP_RANK"] for r in records} == {"0", "1"}


def _run(cmds: list[list[str]], timeout: float = 120) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]


def test_local_elastic_agent_two_nodes(etcd, tmp_path: Path) -> None:
    run_id = new_run_id("agent")
    node = [sys.executable, str(ROOT / "tests" / "agent_node.py"), "etcd", etcd.endpoint, run_id, "2", "2",
            str(tmp_path), CONF]
    _run([node, node])
    _check_ranks(tmp_path, 4)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_stock_torchrun_with_etcd_v3_plugin(etcd35, tmp_path: Path) -> None:
    from importlib.metadata import entry_points

    assert "etcd-v3" in {ep.name for ep in entry_points(group="torchrun.handlers")}, (
        "install the package (pip install -e .) so torchrun sees the entry point"
    )
    run_id = new_run_id("torchrun")
    conf = "lease_ttl=3,last_call_timeout=1,join_timeout=60"
    node = ["torchrun", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=etcd-v3",
            f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}", f"--rdzv-conf={conf}",
            str(ROOT / "tests" / "workers" / "allreduce.py"), str(tmp_path)]
    _run([node, node])
    _check_ranks(tmp_path, 4)
