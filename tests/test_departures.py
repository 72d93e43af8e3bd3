"""A peer's departure is a membership change, not a failure (issue 11).

Real rdzv-launch nodes on loopback whose workers run gloo all_reduce continuously (so a
departing peer breaks a collective before its departure is visible, the race torch loses) and
report through files. Each scenario checks how the nodes end, that the restart budget is
spent only by real worker failures, and that after the event the workers of every node see the
same TORCHELASTIC_RESTART_COUNT and RDZV_ROUND. A short lease keeps the waits short; nothing
here asserts a duration (the `[figure]` lines print the measured ones).
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import etcd
import pytest
from etcd_harness import EtcdServer
from launcher_helpers import Launcher, free_port, launchers, write_script
from rdzv_testlib import FAST_CONF, NodeProcess, new_run_id
from torch.distributed.elastic.rendezvous import RendezvousParameters
from waiting import wait_until

from rdzv import create_handler
from rdzv.etcd import EtcdClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LEASE_TTL = 3
SIGNAL_EXIT = 1  # torchrun's exit code when stopped by a handled signal (2.9-2.15)

# A worker: gloo all_reduce in a loop; <out>/w<pid>.json says who it is (node, rank, world,
# restart count, round) and how far it got. Every worker stops at the same step once <out>/stop
# exists (the flag is all-reduced too). The rank named in <out>/crash exits 3 once.
TRAINER = r"""
import json, os, sys, time
import torch
import torch.distributed as dist

out = sys.argv[1]
dist.init_process_group("gloo")
env = os.environ
rank = dist.get_rank()
rec = {"node": env["RDZV_LAUNCHER_TEST_TAG"], "pid": os.getpid(), "rank": rank,
       "world": dist.get_world_size(), "restart": int(env["TORCHELASTIC_RESTART_COUNT"]),
       "round": env.get("RDZV_ROUND"), "step": 0}
path = os.path.join(out, f"w{os.getpid()}.json")

def save():
    rec["time"] = time.time()
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)

crash = os.path.join(out, "crash")
flag = torch.zeros(1)
saved = 0.0
while True:
    flag[0] = 1.0 if os.path.exists(os.path.join(out, "stop")) else 0.0
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    rec["step"] += 1
    if flag[0] > 0:
        break
    if rec["step"] == 1:
        rec["running_at"] = time.time()
    if rec["step"] == 1 or time.monotonic() - saved > 0.5:
        save()
        saved = time.monotonic()
    if rec["step"] >= 5 and os.path.exists(crash):
        try:
            with open(crash) as f:
                victim = int(f.read())
            if victim == rank:
                os.rename(crash, crash + ".done")
                os._exit(3)
        except (OSError, ValueError):
            pass
    time.sleep(0.01)
rec["done"] = True
save()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


@dataclass
class Job:
    backend: str
    endpoint: str
    out: Path
    run_id: str
    extra_conf: str = ""

    def args(self, nnodes: str, *more: str) -> list[str]:
        conf = f"lease_ttl={LEASE_TTL},last_call_timeout=3,join_timeout=60"
        if self.extra_conf:
            conf += "," + self.extra_conf
        return [
            f"--nnodes={nnodes}",
            "--nproc-per-node=1",
            f"--rdzv-backend={self.backend}",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
            "--local-addr=127.0.0.1",
            "--monitor-interval=0.1",
            *more,
            str(self.out / "trainer.py"),
            str(self.out),
        ]


@pytest.fixture
def job_for(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str], Job]:
    def make(backend: str) -> Job:
        if backend == "etcd":
            endpoint = request.getfixturevalue("etcd35").endpoint
        elif backend == "etcd-v2":
            endpoint = request.getfixturevalue("etcd_v2").endpoint
        else:
            endpoint = f"127.0.0.1:{free_port()}"
        write_script(tmp_path, "trainer.py", TRAINER)
        return Job(backend, endpoint, tmp_path, f"dep-{uuid.uuid4().hex[:8]}")

    return make


# ---------------------------------------------------------------------------- what workers say


def _workers(out: Path) -> list[dict]:
    found = []
    for path in out.glob("w*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced
    return found


def _latest(out: Path) -> dict[str, dict]:
    """Each node's newest worker (by when it started running)."""
    newest: dict[str, dict] = {}
    for rec in _workers(out):
        if "running_at" not in rec:
            continue
        if rec["node"] not in newest or rec["running_at"] > newest[rec["node"]]["running_at"]:
            newest[rec["node"]] = rec
    return newest


def _group(out: Path, nodes: list[Launcher], after: int = 0) -> dict[str, dict] | None:
    """The newest workers of `nodes` if they run together in one round later than `after`."""
    latest = _latest(out)
    recs = [latest.get(n.tag) for n in nodes]
    if any(r is None or r["round"] is None for r in recs):
        return None
    rounds = {int(r["round"]) for r in recs}  # type: ignore[index]
    if len(rounds) != 1 or rounds.pop() <= after or any(r["world"] != len(nodes) for r in recs):  # type: ignore[index]
        return None
    return {n.tag: r for n, r in zip(nodes, recs, strict=True)}  # type: ignore[misc]


def _await_group(out: Path, nodes: list[Launcher], after: int = 0, timeout: float = 90) -> dict[str, dict]:
    found: dict[str, dict] = {}

    def formed() -> bool:
        group = _group(out, nodes, after)
        if group is not None:
            found.update(group)
        return group is not None

    wait_until(formed, timeout, f"{len(nodes)} node(s) training in a round after {after}", lambda: _describe(out, nodes))
    return found


def _agree(group: dict[str, dict]) -> tuple[int, int]:
    """Every node's workers see the same restart count and round; returns them."""
    seen = {(r["restart"], int(r["round"])) for r in group.values()}
    assert len(seen) == 1, f"workers disagree on (restart count, round): {group}"
    return seen.pop()


def _describe(out: Path, nodes: list[Launcher]) -> str:
    workers = "\n".join(json.dumps(r) for r in sorted(_workers(out), key=lambda r: r.get("running_at", 0)))
    return "\n".join(n.describe() for n in nodes) + f"\n--- workers:\n{workers}"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[[list[str]], Launcher]]:
    with launchers(tmp_path) as start:
        yield start


def _start_pair(start: Callable[[list[str]], Launcher], args: list[str]) -> list[Launcher]:
    """Two nodes; the first is up (it serves a c10d store) before the second starts."""
    first = start(args)
    wait_until(lambda: "rdzv-launch: 1 worker(s)" in first.stderr, 60, "the first node to start", first.describe)
    return [first, start(args)]


def _stop_and_finish(out: Path, survivors: list[Launcher]) -> None:
    (out / "stop").touch()
    for node in survivors:
        assert node.wait(60) == 0, _describe(out, survivors)


def _etcd_keys(job: Job) -> list[str]:
    if job.backend == "etcd":
        client = EtcdClient(job.endpoint)
        try:
            return [kv.key.decode() for kv in client.range(f"/rdzv/{job.run_id}/", prefix=True, keys_only=True).kvs]
        finally:
            client.close()
    host, port = job.endpoint.rsplit(":", 1)
    try:
        result = etcd.Client(host=host, port=int(port)).read(f"/rdzv/{job.run_id}", recursive=True)
    except etcd.EtcdKeyNotFound:
        return []
    return [leaf.key for leaf in result.leaves if leaf.key != f"/rdzv/{job.run_id}"]


def _figure(name: str, value: float) -> None:
    print(f"[figure] {name}: {value:.2f} s")


# ------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(
    ("backend", "sig"),
    [("etcd", signal.SIGTERM), ("etcd", signal.SIGINT), ("etcd-v2", signal.SIGTERM), ("c10d", signal.SIGTERM)],
    ids=["etcd-SIGTERM", "etcd-SIGINT", "etcd-v2-SIGTERM", "c10d-SIGTERM"],
)
def test_stopped_node_leaves_and_the_survivor_goes_on(
    backend: str, sig: signal.Signals, job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    """With --max-restarts 0, a node stopped by a signal leaves; the survivor re-forms alone."""
    job = job_for(backend)
    # The second node is the one stopped: with c10d the first serves the store.
    pair = _start_pair(nodes, job.args("1:2"))
    before = _await_group(job.out, pair)
    restart, round_no = _agree(before)
    survivor, leaving = pair
    signalled = time.time()
    leaving.signal(sig)
    assert leaving.wait(60) == SIGNAL_EXIT, leaving.describe()
    assert f"stopped by {sig.name}" in leaving.stderr
    assert re.search(rf"{sig.name}: left the group; the other nodes restarted without this node", leaving.stderr), (
        leaving.describe()
    )
    after = _await_group(job.out, [survivor], after=round_no)
    assert _agree(after)[0] == restart == 0, "a departure costs no restart"
    _figure(f"{backend} {sig.name}: signal to the survivor's workers running again", after[survivor.tag]["running_at"] - signalled)
    _stop_and_finish(job.out, [survivor])
    assert "counted restart" not in survivor.stderr, survivor.describe()
    if backend != "c10d":
        assert _etcd_keys(job) == [], "a clean end leaves no key"


@pytest.mark.parametrize("max_restarts", [0, 2])
def test_killed_node_is_a_membership_change(
    max_restarts: int, job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    """SIGKILL of a node (launcher and workers): the survivors' workers fail at once, before
    the lease lapses. With no restarts left they wait for the departure; with restarts left
    the restart is counted at first and refunded when the next round forms without the node."""
    job = job_for("etcd")
    args = job.args("2:3", f"--max-restarts={max_restarts}")
    three = [nodes(args) for _ in range(3)]
    _, round_no = _agree(_await_group(job.out, three))
    killed = time.time()
    three[2].kill()
    survivors = three[:2]
    after = _await_group(job.out, survivors, after=round_no)
    assert _agree(after)[0] == 0, "a departure costs no restart"
    running = max(r["running_at"] for r in after.values()) - killed
    _figure(f"SIGKILL, --max-restarts {max_restarts}: kill to the survivors' workers running again", running)
    _stop_and_finish(job.out, survivors)
    logs = "".join(n.stderr for n in survivors)
    if max_restarts == 0:
        assert "membership restart; 0 of 0 restarts used" in logs, _describe(job.out, survivors)
    else:
        assert re.search(r"membership restart|restart not counted after all", logs), _describe(job.out, survivors)


@pytest.mark.parametrize("backend", ["etcd", "etcd-v2", "c10d"])
def test_node_lost_before_ranks_are_assigned(
    backend: str, job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    """A node killed between the seal of a round and rank assignment (the ~100 ms in which
    torch's agent posts its role info to the round's store): the survivor's wait there ends
    when the loss is seen, instead of at the store's 300 s timeout, and it forms a new round
    alone. The lost node is a bare handler that joins rounds and never posts, which holds the
    window open."""
    job = job_for(backend)
    survivor = nodes(job.args("1:2", "--max-restarts=0"))
    wait_until(lambda: "rdzv-launch: 1 worker(s)" in survivor.stderr, 60, "the first node to start", survivor.describe)
    conf = {"lease_ttl": str(LEASE_TTL), "last_call_timeout": "3", "join_timeout": "60", "read_timeout": "15"}
    victim = NodeProcess(backend, job.endpoint, job.run_id, 1, 2, **conf)
    try:
        wait_until(lambda: any(r["world_size"] == 2 for r in victim.rounds), 90, "a round of both nodes",
                 survivor.describe)
        pair = next(r for r in victim.rounds if r["world_size"] == 2)
        victim.kill()
        wait_until(lambda: "rendezvous again" in survivor.stderr, 60, "the survivor to give the round up",
                 survivor.describe)
        alone = _await_group(job.out, [survivor], after=pair["round"])
    finally:
        victim.stop()
    assert _agree(alone)[0] == 0, "nothing counted: no worker had started"
    assert f"round {pair['round']} cannot complete: node" in survivor.stderr, survivor.describe()
    _stop_and_finish(job.out, [survivor])


def test_frozen_node_is_dropped_and_rejoins(
    job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    """SIGSTOP of a whole node past its lease: the survivor re-forms alone; once the frozen
    node runs again it finds itself dropped and rejoins, all without spending a restart."""
    job = job_for("etcd")
    pair = [nodes(job.args("1:2")) for _ in range(2)]
    _, first = _agree(_await_group(job.out, pair))
    survivor, frozen = pair
    frozen.signal_node(signal.SIGSTOP)
    try:
        _, alone = _agree(_await_group(job.out, [survivor], after=first))
    finally:
        frozen.signal_node(signal.SIGCONT)
    restart, _ = _agree(_await_group(job.out, pair, after=alone))
    assert restart == 0
    _stop_and_finish(job.out, pair)


# ------------------------------------------------------------------------------ worker crashes


def test_worker_crash_without_restarts_ends_the_job(
    job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    job = job_for("etcd")
    pair = [nodes(job.args("1:2")) for _ in range(2)]
    _await_group(job.out, pair)
    (job.out / "crash").write_text("0")
    crashed = time.monotonic()
    codes = [n.wait(60) for n in pair]
    _figure("crash with --max-restarts 0: both nodes ended after", time.monotonic() - crashed)
    assert codes == [1, 1], _describe(job.out, pair)
    logs = "".join(n.stderr for n in pair)
    assert "exitcode  : 3" in logs, _describe(job.out, pair)
    assert "no restarts left (0 of 0 used)" in logs, _describe(job.out, pair)
    assert "membership restart" not in logs, _describe(job.out, pair)


def test_worker_crash_spends_exactly_one_restart(
    job_for: Callable[[str], Job], nodes: Callable[[list[str]], Launcher]
) -> None:
    job = job_for("etcd")
    pair = [nodes(job.args("1:2", "--max-restarts=2")) for _ in range(2)]
    _, round_no = _agree(_await_group(job.out, pair))
    (job.out / "crash").write_text("0")
    restart, _ = _agree(_await_group(job.out, pair, after=round_no))
    assert restart == 1, _describe(job.out, pair)
    _stop_and_finish(job.out, pair)
    assert (job.out / "crash.done").exists()


# --------------------------------------------------------------------- the handler on its own


def test_withdraw_is_seen_at_once_and_seals_without_a_charge(etcd35: EtcdServer) -> None:
    """What torchrun gets from the handler alone: a peer that withdraws is a departure at once
    (num_nodes_waiting), not at lease expiry, and the next round charges no restart even
    though this node reported a failure; a failure with every member back charges one."""
    run_id = new_run_id("withdraw")
    conf = {**FAST_CONF, "lease_ttl": "10"}
    params = RendezvousParameters("etcd", etcd35.endpoint, run_id, 1, 3, **conf)
    a, b, c = (create_handler(params) for _ in range(3))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda h: h.next_rendezvous(), (a, b, c)))
        assert a.restarts == 0 and a.round == b.round == c.round
        # A failure with all members back: one restart for everyone.
        a.count_failure()
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda h: h.next_rendezvous(), (a, b, c)))
        assert (a.restarts, b.restarts, c.restarts) == (1, 1, 1)
        assert not a.departures() and a.num_nodes_waiting() == 0
        c.withdraw()
        wait_until(lambda: a.num_nodes_waiting() > 0 and bool(b.departures()), 5, "the withdrawal to be seen",)
        assert a.departures().nodes == b.departures().nodes and len(a.departures().nodes) == 1
        assert not c.peers_moved_on()
        a.count_failure()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda h: h.next_rendezvous(), (a, b)))
        assert (a.restarts, b.restarts) == (1, 1), "a failure while a member left is not charged"
        wait_until(c.peers_moved_on, 5, "the withdrawn node to see the others move on")
    finally:
        for handler in (c, b, a):
            handler.shutdown()


def test_a_fixed_group_does_not_wait_for_peers_to_move_on() -> None:
    """static: members are never told of a departure, so a leaving node does not wait for them."""
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = new_run_id("static")
    conf = {**FAST_CONF, "read_timeout": "15"}
    a, b = (create_handler(RendezvousParameters("static", endpoint, run_id, 2, 2, rank=str(r), **conf)) for r in (0, 1))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda h: h.next_rendezvous(), (a, b)))
        assert a.notice_time == 0 and not b.departures()
        b.withdraw()
        assert b.peers_moved_on()
    finally:
        b.shutdown()
        a.shutdown()
