"""Garbage under a run's prefix never takes a node down (issue 10).

A node record that does not decode is not a node: ignored, with one warning naming the key. A
round or control record that does not decode leaves running members alone (num_nodes_waiting()
and is_closed() answer as before the write); the next rendezvous fails with
RendezvousStateError naming the key and the command that removes it.

Three layers: the decoders, the handlers of each backend with garbage written next to them
(etcd v3, etcd-v2, c10d; static shares c10d's code), and real rdzv-launch processes on a real
etcd with garbage written while they train and while they form.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from etcd_harness import EtcdServer, free_port
from launcher_helpers import WAIT_FOR_STOP, launchers, records, write_script
from rdzv_testlib import NodeGroup, new_run_id
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousStateError
from waiting import wait_until

from rdzv.backends.c10d.backend import C10dBackend
from rdzv.backends.etcd_v2.backend import EtcdV2Backend
from rdzv.etcd import EtcdClient
from rdzv.rendezvous.decoding import RecordError
from rdzv.rendezvous.records import Assignment, NodeInfo, RoundProgress, RoundRecord

pytestmark = pytest.mark.timeout(240)

GARBAGE = b"{not json at all"
NODE = NodeInfo("abc123", "h", "127.0.0.1", 7, 1234, 1, None, 2)
ROUND = RoundRecord.listing(
    ("abc123", "def456"), round=2, master_addr="127.0.0.1", master_port=1234, min_nodes=1, max_nodes=3,
    view_cursor=5,
)


# ------------------------------------------------------------------ the decoders


def test_valid_records_round_trip() -> None:
    assert NodeInfo.decode(NODE.encode()) == NODE
    assert RoundRecord.decode(ROUND.encode(), 9) == ROUND
    assert RoundRecord.decode(ROUND.encode(), 9).cursor == 9
    assert RoundRecord.decode(ROUND.encode()).ids == ROUND.ids
    header = RoundRecord.decode(ROUND.encode_header(), 9)
    assert header == ROUND and header.head == ROUND.ids and header.world_size == 2
    assert Assignment.decode(Assignment(1, "h", "h").encode()) == Assignment(1, "h", "h")
    progress = RoundProgress(3, 1, 2, 0, ("h1",))
    assert RoundProgress.decode(progress.encode()) == progress
    # Records written before the version field existed still read.
    legacy = {k: v for k, v in json.loads(NODE.encode()).items() if k != "v"}
    assert NodeInfo.decode(json.dumps(legacy)) == NODE


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (GARBAGE, "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", "'node_id'"),
        (json.dumps({**json.loads(NODE.encode()), "v": 2}).encode(), "unknown record version 2"),
        (json.dumps({**json.loads(NODE.encode()), "pid": "7"}).encode(), "'pid' must be an integer"),
        (json.dumps({**json.loads(NODE.encode()), "want": True}).encode(), "'want' must be an integer"),
        (json.dumps({**json.loads(NODE.encode()), "port": 70000}).encode(), "'port'"),
        (json.dumps({**json.loads(NODE.encode()), "host": None}).encode(), "'host' must be a string"),
        (json.dumps({**json.loads(NODE.encode()), "node_id": "a/b"}).encode(), "not a node id"),
        (json.dumps({**json.loads(NODE.encode()), "host": "x" * 20000}).encode(), "more than"),
    ],
)
def test_node_records_that_do_not_decode(raw: bytes, why: str) -> None:
    with pytest.raises(RecordError, match=re.escape(why)):
        NodeInfo.decode(raw)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"ids": []}, "'ids'"),
        ({"ids": ["a", "a"]}, "names a node twice"),
        ({"ids": "ab"}, "'ids'"),
        ({"round": 0}, "'round'"),
        ({"max_nodes": 0}, "'max_nodes'"),
        ({"master_port": "x"}, "'master_port'"),
        ({"v": "1"}, "unknown record version"),
    ],
)
def test_round_records_that_do_not_decode(change: dict[str, object], why: str) -> None:
    with pytest.raises(RecordError, match=re.escape(why)):
        RoundRecord.decode(json.dumps({**json.loads(ROUND.encode()), **change}))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"head": []}, "'head'"),
        ({"head": ["abc123"]}, "first 2 ranks"),
        ({"size": 0}, "'size'"),
        ({"head": ["a/b", "c"]}, "not a node id"),
        ({"v": 3}, "unknown record version 3"),
    ],
)
def test_round_headers_that_do_not_decode(change: dict[str, object], why: str) -> None:
    with pytest.raises(RecordError, match=re.escape(why)):
        RoundRecord.decode(json.dumps({**json.loads(ROUND.encode_header()), **change}))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"rank": -1, "host": "h", "name": "h"}', "'rank'"),
        (b'{"rank": 1, "name": "h"}', "'host'"),
        (GARBAGE, "not JSON"),
    ],
)
def test_assignments_that_do_not_decode(raw: bytes, why: str) -> None:
    with pytest.raises(RecordError, match=re.escape(why)):
        Assignment.decode(raw)


# ------------------------------------------------------------------ every backend's handlers

BACKENDS = ["etcd@3.5", "etcd-v2@3.4", "c10d"]


@dataclass
class Target:
    """Where one backend keeps a run's records, and how to write garbage there by hand."""

    name: str
    endpoint: str
    write: Callable[[RendezvousHandler, str, bytes], str]  # (handler, kind, value) -> key written


def _etcd_write(endpoint: str) -> Callable[[RendezvousHandler, str, bytes], str]:
    def write(handler: RendezvousHandler, kind: str, value: bytes) -> str:
        root = f"/rdzv/{handler.get_run_id()}/"
        key = {"round": root + "ctl/current", "node": root + "node/zzzzzz"}[kind]
        with EtcdClient(endpoint) as client:
            client.put(key, value)
        return key

    return write


def _v2_write(handler: RendezvousHandler, kind: str, value: bytes) -> str:
    backend = handler.backend  # type: ignore[attr-defined]
    assert isinstance(backend, EtcdV2Backend)
    key = {"round": backend.keys.state, "node": backend.keys.node("zzzzzz")}[kind]
    backend.client.write(key, value.decode(errors="replace"))
    return key


def _c10d_write(handler: RendezvousHandler, kind: str, value: bytes) -> str:
    # What another client of the TCPStore could do: write a value and log the change, as the
    # backend itself does, so every feed reads it.
    backend = handler.backend  # type: ignore[attr-defined]
    assert isinstance(backend, C10dBackend)
    keys, conn = backend.keys, backend.conn
    if kind == "round":
        conn.set(keys.state, value)
        keys.ctl.append(conn, "state")
        keys.all.append(conn, "state")
        return keys.state
    conn.set(keys.full("node/zzzzzz"), b"1 " + value)
    conn.append(keys.ids, "zzzzzz\n")
    keys.all.append(conn, "node/zzzzzz")
    return keys.full("node/zzzzzz")


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, etcd_servers: Callable[[str], EtcdServer]) -> Target:
    name, _, version = request.param.partition("@")
    if name == "etcd":
        endpoint = etcd_servers(version).endpoint
        return Target(name, endpoint, _etcd_write(endpoint))
    if name == "etcd-v2":
        return Target(name, etcd_servers(version).endpoint, _v2_write)
    return Target(name, f"127.0.0.1:{free_port()}", _c10d_write)


@pytest.fixture
def group(target: Target) -> Iterator[NodeGroup]:
    # c10d: TCPStore's reverse DNS lookups can stall ops for 5 s here (see the conformance tests).
    conf = {"read_timeout": "15"} if target.name == "c10d" else {}
    g = NodeGroup(target.name, target.endpoint, new_run_id("hostile"), **conf)
    try:
        yield g
    finally:
        g.shutdown()


def _warnings(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and key in r.getMessage()]


def _warned_after_poll(caplog: pytest.LogCaptureFixture, key: str, *handlers: RendezvousHandler) -> bool:
    # Members read their feeds when polled (as torch's agent does every 0.1 s).
    for handler in handlers:
        assert handler.num_nodes_waiting() == 0
    return bool(_warnings(caplog, key))


def test_garbage_node_record_is_not_a_node(target: Target, group: NodeGroup, caplog: pytest.LogCaptureFixture) -> None:
    a, b = group.node(2, 3), group.node(2, 3)
    group.join_all([a, b])
    assert a.num_nodes_waiting() == 0
    key = target.write(a, "node", GARBAGE)
    target.write(a, "node", GARBAGE + b" again")  # a second bad write: still one warning
    if target.name != "etcd":
        # etcd v3 members never read node records (the next round's coordinator does, below).
        wait_until(lambda: _warned_after_poll(caplog, key, a, b), 20, "the warning about the bad record")
    for _ in range(20):  # every poll drains the feeds; none may count the record as a node
        assert a.num_nodes_waiting() == 0 and b.num_nodes_waiting() == 0
        assert not a.is_closed()
    # A late node forms with the group: the bad record is not counted (3 = max would be full).
    late = group.node(2, 3)
    future = group.join(late)
    wait_until(lambda: a.num_nodes_waiting() == 1, 20, "the members to see the late node")
    infos = group.join_all([a, b]) + [future.result(timeout=60)]
    assert sorted(i.rank for i in infos) == [0, 1, 2]
    warnings = _warnings(caplog, key)
    assert len(warnings) == 1, warnings
    assert "not a node record" in warnings[0]


def test_a_foreign_member_key_deleted_is_no_departure(target: Target, group: NodeGroup) -> None:
    """etcd v3 members count a departure from the delete of a live key the seal wrote. A
    valid-looking one written by hand under the round's prefix and deleted again, or garbage
    there, is no departure: the group keeps running."""
    if target.name != "etcd":
        pytest.skip("etcd v3 only: the other backends keep the round in one record")
    a, b = group.node(2, 3), group.node(2, 3)
    group.join_all([a, b])
    assert a.num_nodes_waiting() == 0 and b.num_nodes_waiting() == 0
    root = f"/rdzv/{a.get_run_id()}/round/000000000001/live/"
    with EtcdClient(target.endpoint) as client:
        client.put(root + "zzzzzz", Assignment(1, "h", "h").encode())
        client.put(root + "yyyyyy", GARBAGE)
        client.delete(root + "zzzzzz")
        client.delete(root + "yyyyyy")
        marker = client.put(f"/rdzv/{a.get_run_id()}/ctl/lastcall/000000000009", b"1.0")
    # The marker's event comes after the deletes: once a member saw it, it saw them.
    wait_until(lambda: a.num_nodes_waiting() == 0 and 9 in a.rendezvous._membership.feed.control.last_call,  # type: ignore[attr-defined]
               20, "the members to read past the deletes")
    assert marker is not None
    for handler in (a, b):
        assert handler.num_nodes_waiting() == 0 and handler.rendezvous.departures().nodes == ()  # type: ignore[attr-defined]


def test_garbage_round_record_spares_members_and_fails_the_next_join(
    target: Target, group: NodeGroup, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = group.node(2, 3), group.node(2, 3)
    group.join_all([a, b])
    key = target.write(a, "round", GARBAGE)
    wait_until(lambda: _warned_after_poll(caplog, key, a, b), 20, "the warning about the bad round record")
    for _ in range(20):  # members answer as before the write
        assert a.num_nodes_waiting() == 0 and b.num_nodes_waiting() == 0
        assert not a.is_closed() and not b.is_closed()
    late = group.node(2, 3)
    with pytest.raises(RendezvousStateError) as failure:
        late.next_rendezvous()
    message = str(failure.value)
    assert key in message and "\n" not in message, message
    hint = {"etcd": "rdzv clean --rdzv-endpoint=", "etcd-v2": "curl -X DELETE", "c10d": "restart the node"}
    assert hint[target.name] in message, message
    with pytest.raises(RendezvousStateError, match=re.escape(key)):
        a.next_rendezvous()  # a member's next round fails the same way


# ------------------------------------------------------------------ real launchers, real etcd

CONF = "lease_ttl=3,last_call_timeout=1,join_timeout=60"


@dataclass
class Job:
    endpoint: str
    run_id: str
    out: Path

    @property
    def root(self) -> str:
        return f"/rdzv/{self.run_id}/"

    def args(self, nnodes: str = "2") -> list[str]:
        return [
            f"--nnodes={nnodes}", "--rdzv-backend=etcd", f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}", f"--rdzv-conf={CONF}", "--local-addr=127.0.0.1",
            "--progress-interval=0.5", "--nproc-per-node=1", "--max-restarts=2",
            str(self.out / "wait.py"), str(self.out),
        ]

    def put(self, rel: str, value: bytes) -> str:
        with EtcdClient(self.endpoint) as client:
            client.put(self.root + rel, value)
        return self.root + rel

    def keys(self) -> list[str]:
        with EtcdClient(self.endpoint) as client:
            return [kv.key.decode() for kv in client.range(self.root, prefix=True, keys_only=True).kvs]

    def node_ids(self) -> list[str]:
        return [k[len(self.root + "node/") :] for k in self.keys() if k.startswith(self.root + "node/")]


@pytest.fixture
def job(etcd35: EtcdServer, tmp_path: Path) -> Job:
    write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    return Job(etcd35.endpoint, f"hostile-{uuid.uuid4().hex[:8]}", tmp_path)


def _formed(out: Path, size: int) -> bool:
    recs = records(out)
    return sorted(recs) == list(range(size)) and all(r["WORLD_SIZE"] == str(size) for r in recs.values())


def _warned(node, key: str) -> int:  # noqa: ANN001 - a launcher_helpers.Launcher
    return sum(1 for line in node.stderr.splitlines() if key in line and "W" in line.split(" ", 1)[0])


def _figure(what: str, seconds: float) -> None:
    # Shown with -s; docs/failure-model.md quotes these.
    print(f"[figure] hostile keys: {what}: {seconds:.1f} s", flush=True)


def _one_line_error(text: str) -> list[str]:
    return [line for line in text.splitlines() if "RendezvousStateError" in line]


def test_launchers_train_on_through_garbage_in_every_key(job: Job) -> None:
    """Garbage in every kind of key while two nodes train: they keep training and exit 0; a
    node that tries to join meanwhile fails with one line naming the bad round record."""
    with launchers(job.out) as start:
        nodes = [start(job.args()), start(job.args())]
        describe = lambda: "\n".join(n.describe() for n in nodes)  # noqa: E731
        wait_until(lambda: _formed(job.out, 2), 90, "a group of 2", describe)
        pids = {r["pid"] for r in records(job.out).values()}
        written = time.monotonic()
        bad = [
            job.put("ctl/current", GARBAGE),
            job.put("node/zzzzzz", GARBAGE),
            job.put("node/yyyyyy", json.dumps({"v": 1, "node_id": "yyyyyy"}).encode()),
            job.put("ctl/closed", b"maybe"),
            job.put("ctl/coord/000000000002", b"someone"),  # a claim not on any node's lease
            job.put("ctl/coord/notanumber", b"x"),
            job.put("ctl/lastcall/000000000002", b"soon"),
            job.put("ctl/lease", b"-1"),
            job.put("ctl/progress/000000000002", b"[]"),
            job.put("round/000000000001/rank/zzzzzz", GARBAGE),
            job.put("round/000000000001/live/zzzzzz", GARBAGE),
            job.put("store/000000000001/torchelastic/agent/terminal_state/num_members", b"many"),
        ]
        # Each launcher says once per control record that it ignores it: the event that it was
        # read. Members read no node records and no other member's keys while they train.
        read = [key for key in bad if "/ctl/" in key]
        for node in nodes:
            for key in read:
                wait_until(lambda n=node, k=key: _warned(n, k) >= 1, 30, f"a warning about {key}", describe)
        _figure("12 bad keys written, every control key read and warned about by both nodes", time.monotonic() - written)
        # A node that wants a new round now cannot get one, and says why in one line.
        started = time.monotonic()
        late = start(job.args("2:3"))
        assert late.wait(60) == 1, late.describe()
        _figure("a joining node's launcher refused (start to exit)", time.monotonic() - started)
        lines = _one_line_error(late.stderr)
        assert len(lines) == 1 and "ctl/" in lines[0] and "rdzv clean --rdzv-endpoint=" in lines[0], late.describe()
        assert "Traceback" not in late.stderr, late.describe()
        assert all(n.proc.poll() is None for n in nodes), describe()
        assert {r["pid"] for r in records(job.out).values()} == pids, "no worker restarted"
        (job.out / "stop").touch()
        for node in nodes:
            assert node.wait(60) == 0, node.describe()
            assert "Traceback" not in node.stderr, node.describe()
            for key in read:
                assert _warned(node, key) == 1, (key, node.describe())
    assert job.keys() == [], "the last node out removes every key, the bad ones too"


def test_a_members_record_overwritten_while_training(job: Job) -> None:
    """Garbage over a member's own record: members never read node records while they train
    (their departures come from their live keys), so the group trains on; the next round's
    coordinator reads it as no node, and the member's next announce replaces it."""
    with launchers(job.out) as start:
        nodes = [start(job.args("2:3")), start(job.args("2:3"))]
        describe = lambda: "\n".join(n.describe() for n in nodes)  # noqa: E731
        wait_until(lambda: _formed(job.out, 2), 90, "a group of 2", describe)
        before = {r["pid"] for r in records(job.out, 0).values()}
        victim = job.node_ids()[0]
        key = job.put(f"node/{victim}", GARBAGE)
        # A third node makes the group re-form: the victim announces itself again.
        nodes.append(start(job.args("2:3")))
        wait_until(lambda: _formed(job.out, 3) and not before & {r["pid"] for r in records(job.out, 0).values()},
                 90, "the group of 3", describe)
        with EtcdClient(job.endpoint) as client:
            fresh = client.get(key)
        assert fresh is not None and NodeInfo.decode(fresh.value).node_id == victim, "announced again"
        (job.out / "stop").touch()
        for node in nodes:
            assert node.wait(60) == 0, node.describe()
            assert "Traceback" not in node.stderr, node.describe()
    assert job.keys() == []


def test_garbage_while_a_group_forms(job: Job) -> None:
    """While the first node waits for the second: garbage in a node key (a stranger's and the
    waiting coordinator's own) does not stop the group forming; garbage in the round record
    fails the waiting nodes with one line naming it."""
    with launchers(job.out) as start:
        first = start(job.args())
        wait_until(lambda: "1/2 nodes" in first.stderr or "waiting for rendezvous" in first.stderr, 60,
                 "the first node waiting", first.describe)
        stranger = job.put("node/zzzzzz", GARBAGE)
        own = job.put(f"node/{job.node_ids()[0]}", GARBAGE)  # the coordinator's own record
        wait_until(lambda: _warned(first, own) == 1, 30, "the warning about its own record", first.describe)
        second = start(job.args())
        wait_until(lambda: _formed(job.out, 2), 90, "a group of 2", lambda: first.describe() + second.describe())
        (job.out / "stop").touch()
        for node in (first, second):
            assert node.wait(60) == 0, node.describe()
        assert _warned(first, stranger) == 1

    run2 = Job(job.endpoint, f"hostile-{uuid.uuid4().hex[:8]}", job.out)
    (job.out / "stop").unlink()
    with launchers(job.out) as start:
        first = start(run2.args())
        wait_until(lambda: bool(run2.node_ids()), 60, "the first node waiting", first.describe)
        key = run2.put("ctl/current", GARBAGE)
        written = time.monotonic()
        assert first.wait(60) == 1, first.describe()
        _figure("bad round record while forming -> the waiting launcher exited", time.monotonic() - written)
        lines = _one_line_error(first.stderr)
        assert len(lines) == 1 and key in lines[0], first.describe()
        assert "Traceback" not in first.stderr, first.describe()
    assert run2.keys() == [], "the failed node leaves no keys (it was the only one)"
