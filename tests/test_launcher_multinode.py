"""Several rdzv-launch processes as the nodes of one job, on this machine.

Parametrized over rendezvous backends: adding one is one entry in BACKENDS (and, if it needs a
server, one branch in the `backend` fixture).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from launcher_helpers import (
    ENV_DUMP,
    WAIT_FOR_STOP,
    free_port,
    launchers,
    records,
    write_script,
)
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BACKENDS = ["c10d", "etcd"]
# Backends whose handler survives scale-up and node loss (torch 2.13's c10d does not: see
# /work/shared/reference/scaling-notes.md, "scale-up hang" and "dead nodes are invisible").
ELASTIC_BACKENDS = ["etcd"]


@dataclass
class Backend:
    name: str
    endpoint: str
    conf: str

    def args(self, run_id: str, nnodes: str) -> list[str]:
        return [
            f"--nnodes={nnodes}",
            f"--rdzv-backend={self.name}",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf={self.conf}",
            "--local-addr=127.0.0.1",
            "--progress-interval=0.5",
        ]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "etcd":
        try:
            import rdzv.backends.etcd_v3.backend  # noqa: F401
        except ImportError:
            pytest.skip("etcd handler not yet available")
        server = request.getfixturevalue("etcd35")
        return Backend("etcd", server.endpoint, "lease_ttl=3,last_call_timeout=1,join_timeout=60")
    return Backend(request.param, f"127.0.0.1:{free_port()}", "last_call_timeout=1,join_timeout=60")


def _run_id() -> str:
    return f"launch-{uuid.uuid4().hex[:8]}"


def test_two_nodes(backend: Backend, tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    run_id = _run_id()
    node_args = [*backend.args(run_id, "2"), "--nproc-per-node=2", str(script), str(tmp_path)]
    with launchers(tmp_path) as start:
        first = start(node_args)
        # Alone, the first node says what it waits for (at most every --progress-interval).
        waiting = rf"(waiting for rendezvous {run_id} \(2 nodes, {backend.name} at |rendezvous {run_id} round \d+: \d/2 nodes)"
        wait_until(lambda: re.search(waiting, first.stderr) is not None, 30, "a progress line", first.describe)
        second = start(node_args)
        for node in (first, second):
            assert node.wait(90) == 0, node.describe()
    recs = records(tmp_path, 0)
    assert sorted(recs) == [0, 1, 2, 3]
    assert {r["WORLD_SIZE"] for r in recs.values()} == {"4"}
    assert {r["GROUP_RANK"] for r in recs.values()} == {"0", "1"}
    assert {r["LOCAL_WORLD_SIZE"] for r in recs.values()} == {"2"}
    assert {r["TORCHELASTIC_RUN_ID"] for r in recs.values()} == {run_id}
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in recs.values()}) == 1
    formed = [re.search(rf"rendezvous {run_id}.* complete: node rank (\d) of 2 nodes", n.stderr) for n in (first, second)]
    assert sorted(m.group(1) for m in formed if m) == ["0", "1"]


@pytest.mark.parametrize("backend", ["etcd"], indirect=True)
@pytest.mark.parametrize("nprocs", [(2, 2), (1, 2)], ids=["identical", "mixed"])
def test_worker_ranks_without_the_store_when_every_node_runs_the_same(
    backend: Backend, tmp_path: Path, nprocs: tuple[int, int]
) -> None:
    # Identical nodes: torch's fast path, from the node rank alone (no role info in the store).
    # Different --nproc-per-node: torch's general path through the round's store, as before.
    from rdzv.etcd import EtcdClient

    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    run_id = _run_id()
    client = EtcdClient(backend.endpoint)
    watch = client.watch(f"/rdzv/{run_id}/store/", prefix=True)
    try:
        with launchers(tmp_path) as start:
            nodes = [start([*backend.args(run_id, "2"), f"--nproc-per-node={n}", str(script), str(tmp_path)])
                     for n in nprocs]
            for node in nodes:
                assert node.wait(90) == 0, node.describe()
        written: list[str] = []
        while (batch := watch.get(1)) is not None:
            written += [e.kv.key.decode() for e in batch if e.type == "PUT"]
    finally:
        watch.cancel()
        client.close()
    world = sum(nprocs)
    recs = records(tmp_path, 0)
    assert sorted(recs) == list(range(world))
    assert {r["WORLD_SIZE"] for r in recs.values()} == {str(world)}
    assert all(r["ROLE_RANK"] == str(rank) for rank, r in recs.items())
    assert {r["ROLE_WORLD_SIZE"] for r in recs.values()} == {str(world)}
    role_infos = [k for k in written if "torchelastic/role_info/" in k]
    assert (role_infos == []) == (nprocs[0] == nprocs[1]), written


def _world(out: Path, size: int) -> bool:
    recs = records(out, 0)
    return all(recs.get(r, {}).get("WORLD_SIZE") == str(size) for r in range(size))


@pytest.mark.parametrize("backend", ELASTIC_BACKENDS, indirect=True)
def test_scale_up_with_a_third_node(backend: Backend, tmp_path: Path) -> None:
    script = write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    node_args = [*backend.args(_run_id(), "2:3"), "--nproc-per-node=1", "--max-restarts=3", str(script), str(tmp_path)]
    with launchers(tmp_path) as start:
        nodes = [start(node_args), start(node_args)]
        wait_until(lambda: _world(tmp_path, 2), 60, "a group of 2", lambda: "\n".join(n.describe() for n in nodes))
        nodes.append(start(node_args))
        wait_until(lambda: _world(tmp_path, 3), 60, "a group of 3", lambda: "\n".join(n.describe() for n in nodes))
        (tmp_path / "stop").touch()
        for node in nodes:
            assert node.wait(60) == 0, node.describe()
    assert {r["GROUP_WORLD_SIZE"] for r in records(tmp_path, 0).values()} == {"3"}


@pytest.mark.parametrize("backend", ELASTIC_BACKENDS, indirect=True)
def test_node_loss(backend: Backend, tmp_path: Path) -> None:
    script = write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    node_args = [*backend.args(_run_id(), "2:3"), "--nproc-per-node=1", "--max-restarts=3", str(script), str(tmp_path)]
    with launchers(tmp_path) as start:
        nodes = [start(node_args) for _ in range(3)]
        wait_until(lambda: _world(tmp_path, 3), 60, "a group of 3", lambda: "\n".join(n.describe() for n in nodes))
        # SIGKILL a whole node: its launcher and its workers, nothing gets to say goodbye.
        nodes.pop().kill()
        for path in tmp_path.glob("*_*.json"):
            path.unlink()
        wait_until(lambda: _world(tmp_path, 2), 60, "the survivors to re-form", lambda: "\n".join(n.describe() for n in nodes))
        (tmp_path / "stop").touch()
        for node in nodes:
            assert node.wait(60) == 0, node.describe()


# Node 0's worker fails a little after node 1's worker succeeded.
FAIL_ON_NODE_0 = """
import os, sys, time
if os.environ["GROUP_RANK"] == "0":
    time.sleep(3)
    sys.exit(7)
"""


def test_failed_peer_does_not_hold_the_others_at_exit(backend: Backend, tmp_path: Path) -> None:
    """A node whose workers succeeded stops waiting in the exit barrier once a failed peer left.

    torch's agent would wait out the whole exit barrier timeout (300 s) for a peer that never
    checks in; ours says what it waits for and ends when the run closes without that peer.
    """
    script = write_script(tmp_path, "fail0.py", FAIL_ON_NODE_0)
    run_id = _run_id()
    node_args = [*backend.args(run_id, "2"), "--nproc-per-node=1", str(script)]
    with launchers(tmp_path) as start:
        nodes = [start(node_args), start(node_args)]
        codes = {}
        for node in nodes:
            # Far below the barrier's 300 s: the survivor left because the failed node did.
            codes[node] = node.wait(90)
        failed = [n for n in nodes if codes[n] != 0]
        survived = [n for n in nodes if codes[n] == 0]
        assert len(failed) == 1 and len(survived) == 1, "\n".join(n.describe() for n in nodes)
        survivor = survived[0]
        assert "waiting up to 300 s for the other nodes to finish" in survivor.stderr, survivor.describe()
        assert "stopped waiting for the other nodes" in survivor.stderr or "not waiting for it" in survivor.stderr, (
            survivor.describe()
        )
        assert "exitcode  : 7" in failed[0].stderr, failed[0].describe()
