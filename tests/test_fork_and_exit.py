"""A process forked while its parent holds a live handler can rendezvous on its own, and a
program that never calls shutdown() exits promptly, its keys expiring after it.

Each scenario runs as its own program (a subprocess): the fork happens in a process whose
gRPC state is known, and a hang is a timeout here, never a wedged pytest. (gRPC's own fork
support, ``GRPC_ENABLE_FORK_SUPPORT=1``, is not covered: with long-lived streams it holds up
the parent's fork for seconds and breaks the child now and then; docs/etcd-client.md.)
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import etcd
import pytest
from etcd_harness import EtcdServer, free_port
from rdzv_testlib import FAST_CONF, ROOT, new_run_id
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv.backends.etcd_v2.client import EtcdV2Client, EtcdV2Error
from rdzv.etcd import EtcdClient, EtcdError
from rdzv.rendezvous.settings import parse_settings

# The parent: one live handler (its own 1-node run, joined: leases, keep-alive and watch
# streams, pooled HTTP connections), then a fork. The child creates a handler and forms a
# 2-node round with a second handler of the parent, sets a key in the round's store and
# reports through a pipe. The parent then uses both of its handlers again.
FORK_PROGRAM = r"""
import json, multiprocessing, sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from rdzv.registry import create_handler

backend, endpoint, solo_run, pair_run = sys.argv[1:5]
conf = json.loads(sys.argv[5])

def params(run_id, nodes):
    return RendezvousParameters(backend, endpoint, run_id, nodes, nodes, **conf)

def child(conn):
    handler = create_handler(params(pair_run, 2))
    info = handler.next_rendezvous()
    info.store.set("from-child", "hello")
    conn.send({"rank": info.rank, "world_size": info.world_size, "round": handler.round})
    if conn.poll(60):  # the parent read our key: now leave
        conn.recv()
        conn.send(handler.shutdown())

solo = create_handler(params(solo_run, 1))
solo.next_rendezvous()
first_round = solo.round
ctx = multiprocessing.get_context("fork")
ours, theirs = ctx.Pipe()
proc = ctx.Process(target=child, args=(theirs,))
proc.start()  # the solo handler is live: its streams, threads and sockets are copied
pair = create_handler(params(pair_run, 2))
info = pair.next_rendezvous()
report = {"parent": {"rank": info.rank, "world_size": info.world_size, "round": pair.round}}
report["child"] = ours.recv() if ours.poll(60) else None
if report["child"] is not None:
    report["store"] = info.store.get("from-child").decode()
    ours.send("bye")
    report["child_shutdown"] = ours.recv() if ours.poll(60) else None
proc.join(60)
report["child_exitcode"] = proc.exitcode
# The handler that was live across the fork still works: a new round, then a clean end.
solo.next_rendezvous()
report["solo_rounds"] = [first_round, solo.round]
report["waiting"] = solo.num_nodes_waiting()
report["pair_shutdown"] = pair.shutdown()
report["solo_shutdown"] = solo.shutdown()
print(json.dumps(report), flush=True)
"""

# Joins a 1-node round, says so, and ends without shutdown().
EXIT_PROGRAM = r"""
import json, sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from rdzv.registry import create_handler

backend, endpoint, run_id, conf = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
handler = create_handler(RendezvousParameters(backend, endpoint, run_id, 1, 1, **conf))
info = handler.next_rendezvous()
print(json.dumps({"joined": info.rank}), flush=True)
"""


@contextmanager
def _program(tmp_path: Path, source: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run `source` as a program in its own session; whatever it forked dies with it."""
    script = tmp_path / "program.py"
    script.write_text(source)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """The program's stdout lines as they come (None at its end)."""
    out: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_v3_keys_gone(endpoint: str, prefix: str, timeout: float) -> None:
    """Until no key is left under `prefix`, following etcd's events (no polling)."""
    client = EtcdClient(endpoint)
    try:
        snapshot = client.range(prefix, prefix=True, keys_only=True)
        left = {kv.key for kv in snapshot.kvs}
        deadline = time.monotonic() + timeout
        with client.watch(prefix, prefix=True, start_revision=snapshot.revision + 1) as watch:
            while left:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"keys still there after {timeout} s: {sorted(left)}"
                for event in watch.get(remaining) or []:
                    (left.discard if event.type == "DELETE" else left.add)(event.kv.key)
    finally:
        client.close()


def _wait_v2_keys_gone(endpoint: str, prefix: str, timeout: float) -> None:
    """Until no key (directories aside: v2 cannot expire those) is left under `prefix`."""
    host, port = endpoint.rsplit(":", 1)
    client = etcd.Client(host=host, port=int(port))
    deadline = time.monotonic() + timeout
    left: set[str] = set()
    index = 0
    while True:
        if index == 0:  # (re)read everything, then follow the events after it
            try:
                result = client.read(prefix, recursive=True)
            except etcd.EtcdKeyNotFound:
                return
            left = {n.key for n in result.leaves if not n.dir}
            index = result.etcd_index
        if not left:
            return
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"keys still there after {timeout} s: {sorted(left)}"
        try:
            event = client.watch(prefix, index=index + 1, recursive=True, timeout=remaining)
        except etcd.EtcdWatchTimedOut:
            continue
        except etcd.EtcdEventIndexCleared:
            index = 0
            continue
        index = event.modifiedIndex
        if event.action in ("delete", "expire", "compareAndDelete"):
            left = {k for k in left if k != event.key and not k.startswith(event.key + "/")}
        elif not event.dir:
            left.add(event.key)


# ------------------------------------------------------------------------------- fork


def _fork_scenario(tmp_path: Path, backend: str, endpoint: str) -> dict:
    args = (backend, endpoint, new_run_id("solo"), new_run_id("pair"), json.dumps(FAST_CONF))
    with _program(tmp_path, FORK_PROGRAM, *args) as proc:
        try:
            out, err = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"the fork scenario hung; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["child"] is not None, f"the child never formed a round; stderr:\n{err[-3000:]}"
    child, parent = report["child"], report["parent"]
    assert child["world_size"] == parent["world_size"] == 2
    assert child["round"] == parent["round"]
    assert {child["rank"], parent["rank"]} == {0, 1}
    assert report["store"] == "hello"  # the child's write, read through the parent's store
    assert report["child_shutdown"] is True and report["child_exitcode"] == 0
    first, second = report["solo_rounds"]
    assert second > first, "the parent's live handler formed a new round"
    assert report["waiting"] == 0
    assert report["pair_shutdown"] is True and report["solo_shutdown"] is True
    return report


def test_forked_child_rendezvous_v3(tmp_path: Path, etcd: EtcdServer) -> None:
    _fork_scenario(tmp_path, "etcd", etcd.endpoint)


def test_forked_child_rendezvous_v2(tmp_path: Path, etcd_v2: EtcdServer) -> None:
    _fork_scenario(tmp_path, "etcd-v2", etcd_v2.endpoint)


def _in_child(work: Callable[[], dict], timeout: float = 60) -> dict:
    """Run `work` in a fork()ed child of this process; its answer comes back through a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return into pytest
        code = 1
        try:
            os.close(read)
            answer = work()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = {"error": repr(exc)}
        finally:
            os.write(write, json.dumps(answer).encode())
            os._exit(code)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                pytest.fail(f"the forked child did not answer within {timeout:g} s")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)  # it wrote and is leaving
        pid = 0
    finally:
        os.close(read)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def test_inherited_v3_client_refuses_and_closes_nothing(etcd34: EtcdServer) -> None:
    """In a child, the parent's client fails fast instead of hanging on the parent's channel,
    closing it touches nothing, and the parent's client and watch stream carry on."""
    client = EtcdClient.shared([etcd34.endpoint])
    try:
        client.put("/fork-test/k", "v")
        with client.watch("/fork-test/", prefix=True) as watch:

            def work() -> dict:
                try:
                    client.get("/fork-test/k", timeout=2)
                    message = "no error"
                except EtcdError as exc:
                    message = str(exc)
                client.close()
                fresh = EtcdClient.shared([etcd34.endpoint])
                fresh.put("/fork-test/child", "1")
                kv = fresh.get("/fork-test/k")
                return {"message": message, "value": kv and kv.value.decode(), "fresh": fresh is not client}

            result = _in_child(work)
            assert "parent process" in result["message"]
            assert result["value"] == "v" and result["fresh"]
            events = watch.get(10)
            assert events and events[0].kv.key == b"/fork-test/child"
            assert client.get("/fork-test/k") is not None
    finally:
        client.delete("/fork-test/", prefix=True)
        client.close()


def test_inherited_v2_client_refuses_and_closes_nothing(etcd_v2: EtcdServer) -> None:
    """The same for the v2 client, whose pooled HTTP connections are the parent's sockets."""
    params = RendezvousParameters("etcd-v2", etcd_v2.endpoint, new_run_id("v2fork"), 1, 1)
    settings = parse_settings(params)
    client = EtcdV2Client.shared(settings)
    try:
        client.write("/fork-test/k", "v")

        def work() -> dict:
            try:
                client.read("/fork-test/k")
                message = "no error"
            except EtcdV2Error as exc:
                message = str(exc)
            client.close()
            fresh = EtcdV2Client.shared(settings)
            fresh.write("/fork-test/child", "1")
            return {"message": message, "value": fresh.read("/fork-test/k").value, "fresh": fresh is not client}

        result = _in_child(work)
        assert "parent process" in result["message"]
        assert result["value"] == "v" and result["fresh"]
        assert client.read("/fork-test/child").value == "1"
    finally:
        with contextlib.suppress(etcd.EtcdKeyNotFound):
            client.delete("/fork-test", recursive=True)
        client.close()


# ------------------------------------------------------------------------------- exit

EXIT_BOUND = 20.0  # seconds from "joined" to the process gone: generous, the bug was ~2 min


def _exits_promptly(tmp_path: Path, backend: str, endpoint: str, run_id: str) -> None:
    args = (backend, endpoint, run_id, json.dumps(FAST_CONF))
    with _program(tmp_path, EXIT_PROGRAM, *args) as proc:
        lines = _lines(proc)
        try:
            line = lines.get(timeout=90)
        except queue.Empty:
            pytest.fail("the program never joined")
        assert line is not None, f"the program ended before joining: {proc.stderr.read()[-3000:]}"  # type: ignore[union-attr]
        joined = time.monotonic()
        try:
            proc.wait(timeout=EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_BOUND:g} s after its last statement")
        assert proc.returncode == 0, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() - joined < EXIT_BOUND


def test_exit_without_shutdown_v3(tmp_path: Path, etcd: EtcdServer) -> None:
    run_id = new_run_id("exit")
    _exits_promptly(tmp_path, "etcd", etcd.endpoint, run_id)
    # Nobody revoked the leases: the run's keys go when they expire (lease_ttl is 2 s).
    _wait_v3_keys_gone(etcd.endpoint, f"/rdzv/{run_id}/", timeout=30)


def test_exit_without_shutdown_v2(tmp_path: Path, etcd_v2: EtcdServer) -> None:
    run_id = new_run_id("exit")
    _exits_promptly(tmp_path, "etcd-v2", etcd_v2.endpoint, run_id)
    # Node keys expire after lease_ttl (2 s), the state document after 3 x lease_ttl.
    _wait_v2_keys_gone(etcd_v2.endpoint, f"/rdzv/{run_id}", timeout=30)


def test_exit_without_shutdown_c10d(tmp_path: Path) -> None:
    _exits_promptly(tmp_path, "c10d", f"127.0.0.1:{free_port()}", new_run_id("exit"))
