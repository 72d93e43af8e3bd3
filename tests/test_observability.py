"""`rdzv events`, `rdzv status --watch` and `rdzv exporter` against a real etcd and real nodes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from launcher_helpers import (
    WAIT_FOR_STOP,
    Launcher,
    clean_env,
    launchers,
    records,
    write_script,
)
from prometheus_client.parser import text_string_to_metric_families
from rdzv_testlib import NodeProcess, new_run_id, node_group
from waiting import wait_until

from rdzv.etcd import EtcdClient, Event, KeyValue
from rdzv.events import EventDeriver
from rdzv.keyfeed import KeyFeed
from rdzv.rendezvous.records import NodeInfo, RoundRecord
from rdzv.view import PrefixView, RunView

pytestmark = pytest.mark.timeout(180)

OPS = [sys.executable, "-m", "launcher.ops"]


def _events(node: Launcher) -> list[dict]:
    return [json.loads(line) for line in node.stdout.splitlines() if line.startswith("{")]


def _find(events: list[dict], name: str, start: int = 0, **match: object) -> int:
    """Index of the first event named `name` at or after `start` whose fields match (-1: none)."""
    for i in range(start, len(events)):
        if events[i]["name"] == name and all(events[i].get(k) == v for k, v in match.items()):
            return i
    return -1


@pytest.mark.slow
def test_events_follow_a_run_through_a_lost_node_and_close(etcd35, tmp_path: Path) -> None:
    run_id = new_run_id("events")
    script = write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    node_args = [
        "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}",
        f"--rdzv-id={run_id}", "--rdzv-conf=lease_ttl=3,last_call_timeout=20,join_timeout=60",
        "--local-addr=127.0.0.1", "--max-restarts=3", str(script), str(tmp_path),
    ]
    with launchers(tmp_path) as start:
        feed = start(["events", "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", run_id, "--follow", "--json"], cmd=OPS)
        wait_until(lambda: "waiting for run" in feed.stderr, 30, "the feed to watch", feed.describe)
        nodes = [start(node_args), start(node_args)]

        def context() -> str:
            return "\n".join(n.describe() for n in [feed, *nodes])

        pids = {n.proc.pid for n in nodes}
        # Both nodes form round 1 together (max_nodes reached before the 20 s last call ends).
        wait_until(lambda: _find(_events(feed), "round_sealed") >= 0, 90, "round 1 sealed", context)
        first = _events(feed)[_find(_events(feed), "round_sealed")]
        assert first["round"] == 1 and {m["pid"] for m in first["members"]} == pids, first
        assert sorted(m["rank"] for m in first["members"]) == [0, 1] and first["master_endpoint"]
        # Once both nodes train, SIGKILL one (launcher and workers): its record expires within lease_ttl.
        wait_until(lambda: sorted(records(tmp_path, 0)) == [0, 1], 60, "both workers running", context)
        lost, survivor = nodes[1], nodes[0]
        lost.kill()
        wait_until(lambda: _find(_events(feed), "round_sealed", round=2) >= 0, 60, "round 2 sealed", context)
        (tmp_path / "stop").touch()
        assert survivor.wait(60) == 0, context()
        assert feed.wait(30) == 0, context()
    events = _events(feed)
    names = [e["name"] for e in events]
    assert all(not e["replayed"] for e in events), "the run started after the feed"
    joined = [e for e in events if e["name"] == "node_joined"]
    assert {e["pid"] for e in joined} == pids and all(e["node_state"] == "INIT" for e in joined)
    sealed_1 = _find(events, "round_sealed", round=1)
    assert all(events.index(e) < sealed_1 for e in joined), names
    assert events[sealed_1]["seconds"] is not None and 0 <= events[sealed_1]["seconds"] < 20
    gone = _find(events, "node_lost", sealed_1, pid=lost.proc.pid)
    assert gone > sealed_1, names
    assert events[gone]["node_state"] == "FAILED" and events[gone]["seconds"] > 0
    assert events[gone]["hostname"] == "127.0.0.1" and events[gone]["round"] == 1
    sealed_2 = _find(events, "round_sealed", gone, round=2)
    assert sealed_2 > gone and [m["pid"] for m in events[sealed_2]["members"]] == [survivor.proc.pid]
    closed = _find(events, "run_closed", sealed_2)
    left = _find(events, "node_left", closed, pid=survivor.proc.pid)
    assert 0 < closed < left < names.index("run_removed") == len(names) - 1, names
    assert _find(events, "node_lost", sealed_2) == -1, "a node leaving a closed run is not lost"
    # Torch's RdzvEvent fields, then ours.
    assert list(events[0])[:10] == ["name", "run_id", "message", "hostname", "pid", "node_state",
                                    "master_endpoint", "rank", "local_id", "error_trace"]
    assert {"round", "members", "ts"} <= set(events[0]) and all(e["run_id"] == run_id for e in events)


def test_events_replay_and_text(etcd35) -> None:
    run_id = new_run_id("replay")

    def ops(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*OPS, *args, "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", run_id],
                              capture_output=True, text=True, env=clean_env(), timeout=60)

    missing = ops("events")
    assert missing.returncode == 1 and missing.stderr.startswith("rdzv: error: no run"), missing
    with node_group("etcd", etcd35.endpoint, run_id) as g:
        g.join_all([g.node(2, 2, local_addr="hostA"), g.node(2, 2, local_addr="hostB")])
        text = ops("events")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert len(lines) == 3 and all(re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}}  {run_id}  ", line) for line in lines)
        assert "joined" in lines[0] and "joined" in lines[1]
        assert "round 1 sealed: 2 node(s) (min 2, max 2) 0=host" in lines[2], lines
        replay = [json.loads(line) for line in ops("events", "--json").stdout.splitlines()]
        assert [e["name"] for e in replay] == ["node_joined", "node_joined", "round_sealed"]
        assert all(e["replayed"] for e in replay)
        assert [m["host"] for m in replay[2]["members"]] == ["hostA", "hostB"]


class Screen:
    """A command on a pseudo-terminal; what it wrote, read by a thread."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=clean_env(),
                                     start_new_session=True)
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self._master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self._master, 65536)
                except OSError:  # EIO: the other side is closed
                    return
                if not data:
                    return
                self._chunks.append(data)
            elif self.proc.poll() is not None:
                return

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    @property
    def frames(self) -> list[str]:
        """Each redraw of the screen (the text after each clear), complete ones only."""
        return self.text.split("\x1b[H\x1b[2J")[1:-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        os.close(self._master)


@contextlib.contextmanager
def screen(args: list[str]) -> Iterator[Screen]:
    shown = Screen(args)
    try:
        yield shown
    finally:
        shown.stop()


def _frame_with(shown: Screen, *needles: str) -> Callable[[], bool]:
    return lambda: any(all(n in frame for n in needles) for frame in shown.frames)


def test_status_watch_redraws_in_a_terminal(etcd35) -> None:
    run_id = new_run_id("live")
    args = [*OPS, "status", "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", run_id, "--watch"]
    with screen(args) as shown:
        with node_group("etcd", etcd35.endpoint, run_id, local_world_size="4") as g:
            wait_until(_frame_with(shown, f"run {run_id}: no keys"), 30, "the first frame", lambda: shown.text)
            a, b = g.node(2, 3, local_addr="hostA"), g.node(2, 3, local_addr="hostB")
            g.join_all([a, b])
            wait_until(_frame_with(shown, "round 1  2 node(s)", "hostB"), 30, "round 1 on screen", lambda: shown.text)
            frame = next(f for f in shown.frames if "round 1  2 node(s)" in f)
            rows = [line.split() for line in frame.splitlines() if re.match(r"\s+[01]\s+host", line)]
            assert [(r[0], r[1], r[2]) for r in rows] == [("0", "hostA", "4"), ("1", "hostB", "4")], frame
            assert "2 node(s) (min 2, max 3)" in frame and re.search(r"age \d+s", frame), frame
            # A newcomer: it waits for round 2, and neither member has asked for it yet.
            late = g.join(g.node(2, 3, local_addr="hostC"))
            wait_until(_frame_with(shown, "forming round 2: asked by hostC", "not back yet (of round 1): hostA, hostB"),
                     30, "the newcomer on screen", lambda: shown.frames[-1])
            count = len(shown.frames)
            wait_until(lambda: len(shown.frames) > count, 10, "a redraw on the clock tick alone", lambda: shown.text)
            g.join_all([a, b])
            late.result(timeout=30)
            wait_until(_frame_with(shown, "round 2  3 node(s)", "hostC"), 30, "round 2 on screen",
                     lambda: shown.frames[-1])
        # A clean end removes the run's keys: the watch ends by itself.
        assert shown.proc.wait(timeout=30) == 0, shown.text[-3000:]


def test_status_watch_prints_blocks_when_not_a_terminal(etcd35, tmp_path: Path) -> None:
    run_id = new_run_id("plain")
    with launchers(tmp_path) as start:
        watch = start(["status", "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", run_id, "--watch"], cmd=OPS)
        wait_until(lambda: "no keys" in watch.stdout, 30, "the first block", watch.describe)
        with node_group("etcd", etcd35.endpoint, run_id) as g:
            g.join_all([g.node(1, 1, local_addr="hostA")])
        assert watch.wait(30) == 0, watch.describe()
    out = watch.stdout
    assert "\x1b" not in out
    blocks = re.split(rf"\n(?=run {run_id})", out.strip())
    assert blocks[0].startswith(f"run {run_id}: no keys") and blocks[-1].startswith(f"run {run_id}: no keys")
    assert "hostA" in out and "round 1  1 node(s)" in out
    # One block per change, never one per clock tick: no block repeats the one before but for the clock.
    steady = [re.sub(r"  age >?=?\S+|  \d\d:\d\d:\d\d", "", block).strip() for block in blocks]
    assert all(x != y for x, y in zip(steady, steady[1:], strict=False)), out


def test_status_watch_usage() -> None:
    proc = subprocess.run([*OPS, "status", "--rdzv-endpoint", "e:1", "--watch"], capture_output=True, text=True,
                          env=clean_env(), timeout=60)
    assert proc.returncode == 2 and "--watch needs --rdzv-id" in proc.stderr


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """{(metric, run_id or ""): value} from /metrics."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, s.labels.get("run_id", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_exporter_serves_every_run_from_one_watch(etcd35, tmp_path: Path) -> None:
    prefix = f"/obs-{uuid.uuid4().hex[:6]}"
    lossy, growing = new_run_id("lossy"), new_run_id("growing")
    exporter_args = ["exporter", "--rdzv-endpoint", etcd35.endpoint, "--prefix", prefix, "--port", "0",
                     "--host", "127.0.0.1"]
    conf = {"prefix": prefix, "lease_ttl": "2"}
    procs: list[NodeProcess] = []
    with launchers(tmp_path) as start, node_group("etcd", etcd35.endpoint, growing, prefix=prefix) as g:
        exporter = start(exporter_args, cmd=OPS)
        wait_until(lambda: "/metrics" in exporter.stderr, 30, "the exporter's address", exporter.describe)
        url = re.search(r"http://\S+/metrics", exporter.stderr).group(0)  # type: ignore[union-attr]
        try:
            # Run 1: two node processes form round 1; one is SIGKILLed; the other re-forms alone.
            procs += [NodeProcess("etcd", etcd35.endpoint, lossy, 1, 2, **conf, local_addr=f"host{i}") for i in range(2)]
            # Run 2: two nodes in round 1, then a newcomer waits for round 2.
            a, b = g.node(2, 3, local_addr="hostA"), g.node(2, 3, local_addr="hostB")
            g.join_all([a, b])

            def metric(name: str, run: str = "") -> float | None:
                return _scrape(url).get((name, run))

            wait_until(lambda: metric("rdzv_run_world_size", lossy) == 2 and metric("rdzv_run_round", lossy) == 1,
                     90, "run 1 in round 1 with 2 nodes", exporter.describe)
            late = g.join(g.node(2, 3, local_addr="hostC"))
            wait_until(lambda: metric("rdzv_run_nodes_waiting", growing) == 1, 30, "a waiting node", exporter.describe)
            values = _scrape(url)
            assert values[("rdzv_run_round", growing)] == 1 and values[("rdzv_run_world_size", growing)] == 2
            assert values[("rdzv_run_min_nodes", growing)] == 2 and values[("rdzv_run_max_nodes", growing)] == 3
            assert values[("rdzv_run_spares", growing)] == 0 and values[("rdzv_run_closed", growing)] == 0
            assert values[("rdzv_exporter_runs", "")] == 2 and values[("rdzv_exporter_up", "")] == 1
            assert values[("rdzv_exporter_watch_events_total", "")] > 0
            assert values[("rdzv_exporter_watch_resyncs_total", "")] == 0
            assert values[("rdzv_run_round_age_seconds", lossy)] >= 0
            procs[1].kill()  # a lost node: its record expires within lease_ttl
            wait_until(lambda: metric("rdzv_run_round", lossy) == 2, 60, "run 1 to re-form", exporter.describe)
            assert metric("rdzv_run_world_size", lossy) == 1 and metric("rdzv_run_lost_members", lossy) == 0
            g.join_all([a, b])
            late.result(timeout=30)
            wait_until(lambda: metric("rdzv_run_world_size", growing) == 3, 30, "run 2 grows", exporter.describe)
            assert metric("rdzv_run_round", growing) == 2 and metric("rdzv_run_nodes_waiting", growing) == 0
            with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=5) as answer:
                assert answer.status == 200 and answer.read().startswith(b"ok: 2 run(s)")
        finally:
            for proc in procs:
                proc.kill()
        exporter.signal(signal.SIGTERM)
        assert exporter.wait(30) == 0, exporter.describe()


def test_keyfeed_resync_delivers_what_changed(etcd35) -> None:
    prefix = f"/feed-{uuid.uuid4().hex[:6]}/"
    with EtcdClient(etcd35.endpoint) as client:
        client.put(prefix + "a", "1")
        client.put(prefix + "b", "1")
        feed = KeyFeed(client, prefix)
        assert [(e.type, e.kv.key[-1:]) for e in feed.start()] == [("PUT", b"a"), ("PUT", b"b")]
        client.put(prefix + "c", "1")
        batch = feed.get(10)
        assert batch and [(e.type, e.kv.key[-1:]) for e in batch] == [("PUT", b"c")]
        feed.close()  # as when etcd ends the watch: the next get reads the prefix afresh
        client.delete(prefix + "a")
        client.put(prefix + "b", "2")
        batch = feed.get(10)
        assert feed.resyncs == 1 and batch is not None
        assert sorted((e.type, e.kv.key[-1:]) for e in batch) == [("DELETE", b"a"), ("PUT", b"b")]
        client.delete(prefix, prefix=True)
        feed.close()


def _put(key: str, value: bytes, rev: int, lease: int = 7) -> Event:
    return Event("PUT", KeyValue(key.encode(), value, rev, rev, 1, lease))


def _delete(key: str, rev: int) -> Event:
    return Event("DELETE", KeyValue(key.encode(), b"", 0, rev, 0, 0))


def test_views_and_events_from_synthetic_keys() -> None:
    view = PrefixView("/p", since=100.0)
    a, b = NodeInfo("aaaa", "hostA", "hostA", 11, 1, 1, local_world_size=8), NodeInfo("bbbb", "hostB", "hostB", 12, 1, 1)
    record = RoundRecord.listing(("aaaa", "bbbb"), round=1, master_addr="hostA", master_port=5000, min_nodes=2, max_nodes=2)
    view.apply(_put("/p/job/node/aaaa", a.encode(), 1), 101.0)
    view.apply(_put("/p/job/node/bbbb", b.encode(), 2), 102.0)
    view.apply(_put("/p/stray", b"x", 3), 103.0)
    run = view.runs["job"]
    deriver = EventDeriver(run)
    assert run.describe(103.0)["waiting"][0]["host"] == "hostA"
    sealed = deriver.derive(run.apply(_put("/p/job/ctl/current", record.encode(), 4, 0), 104.0))
    assert [e.name for e in sealed] == ["round_sealed"] and sealed[0].members[0]["local_world_size"] == 8
    lost = deriver.derive(run.apply(_delete("/p/job/node/bbbb", 5), 110.0))
    assert lost[0].name == "node_lost" and lost[0].seconds == 8.0 and lost[0].rank == 1
    desc = run.describe(111.0)
    assert desc["lost_hosts"] == ["hostB"] and desc["round_age"] == 7.0 and desc["forming"] is None
    again = NodeInfo("aaaa", "hostA", "hostA", 11, 1, 2)
    waiting = deriver.derive(run.apply(_put("/p/job/node/aaaa", again.encode(), 6), 112.0))
    assert waiting[0].name == "node_waiting" and waiting[0].round == 2
    assert run.describe(112.0)["not_back"] == ["hostB"] and run.describe(112.0)["forming"] == 2
    bad = deriver.derive(run.apply(_put("/p/job/ctl/closed", b"yes", 7, 0), 113.0))
    assert bad[0].name == "corrupt_key" and "closed marker" in bad[0].error_trace
    assert view.apply(_put("/p/other/ctl/lease", b"12", 8, 0), 114.0) is not None and len(view.runs) == 2
    for rel in ("node/aaaa", "ctl/current", "ctl/closed"):
        events = deriver.derive(run.apply(_delete(f"/p/job/{rel}", 9), 115.0))
    assert events[-1].name == "run_removed" and "without a close" in events[-1].message
    assert isinstance(RunView("x", "/p/x/", 0.0).describe(1.0), dict)


def test_exporter_healthz_says_when_etcd_fails(tmp_path: Path) -> None:
    from launcher_helpers import free_port

    with launchers(tmp_path) as start:
        exporter = start(["exporter", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--port", "0",
                          "--host", "127.0.0.1", "--rdzv-conf", "timeout=1"], cmd=OPS)
        wait_until(lambda: "/metrics" in exporter.stderr, 30, "the exporter's address", exporter.describe)
        url = re.search(r"http://\S+/healthz", exporter.stderr.replace("/metrics", "/healthz")).group(0)  # type: ignore[union-attr]

        def unhealthy() -> bool:
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as exc:
                return exc.code == 503 and b"not watching" in exc.read()
            return False

        wait_until(unhealthy, 30, "healthz 503", exporter.describe)
        assert _scrape(url.replace("/healthz", "/metrics"))[("rdzv_exporter_up", "")] == 0
        exporter.signal(signal.SIGTERM)
        assert exporter.wait(30) == 0, exporter.describe()


def test_the_dashboard_and_the_docs_use_the_exported_names() -> None:
    from launcher.ops.exporter import ExporterState, ViewCollector

    root = Path(__file__).resolve().parents[1]
    exported = {family.name + ("_total" if family.type == "counter" else "")
                for family in ViewCollector(ExporterState("/rdzv")).collect()}
    dashboard = json.loads((root / "deploy" / "grafana-rdzv-dashboard.json").read_text())
    used = set(re.findall(r"rdzv_[a-z_]+", json.dumps(dashboard)))
    assert used and used <= exported, used - exported
    docs = (root / "docs" / "observability.md").read_text()
    assert all(f"`{name}`" in docs for name in exported), [n for n in exported if f"`{n}`" not in docs]
    events = {"node_joined", "node_waiting", "node_left", "node_lost", "last_call_started", "round_sealed",
              "run_closed", "run_removed", "corrupt_key"}
    assert all(f"`{name}`" in docs for name in events)


def test_the_commands_do_not_import_torch() -> None:
    code = ("import sys, launcher.ops.cli, launcher.ops.events, launcher.ops.live_status, launcher.ops.exporter, "
            "rdzv.events, rdzv.view, rdzv.keyfeed; "
            "launcher.ops.cli.main(['events', '--help']); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "False", proc
