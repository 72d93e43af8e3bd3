"""`rdzv-launch --metrics-port` (issue 13): two real launchers scraped through a node loss, bad
ports refused in one line, and a scraper that never reads does not hold up metric updates."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from launcher_helpers import (
    ALLREDUCE_LOOP,
    LAUNCH,
    Launcher,
    clean_env,
    launchers,
    progress,
    write_script,
)
from prometheus_client.parser import text_string_to_metric_families
from rdzv_testlib import new_run_id
from waiting import wait_until

from launcher.metrics.endpoint import MetricsEndpoint
from launcher.metrics.recorder import FAILURE, MEMBERSHIP, RecoveryTracker
from rdzv.rendezvous.membership import GroupCounts

pytestmark = pytest.mark.timeout(240)

PORT_LINE = re.compile(r"metrics at http://[^:]+:(\d+)/metrics")


def scrape(port: int, path: str = "/metrics", timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels without run_id)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "run_id")
            out[(s.name, labels)] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def metrics_port(node: Launcher) -> int | None:
    match = PORT_LINE.search(node.stderr)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------ two real nodes


@pytest.mark.slow
def test_scrapes_follow_a_node_loss(etcd35, tmp_path: Path) -> None:
    script = write_script(tmp_path, "loop.py", ALLREDUCE_LOOP)
    args = [
        "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}",
        f"--rdzv-id={new_run_id('metrics')}", "--rdzv-conf=lease_ttl=3,last_call_timeout=3,join_timeout=60",
        "--local-addr=127.0.0.1", "--monitor-interval=0.1", "--max-restarts=2", "--metrics-port=0",
        str(script), str(tmp_path),
    ]
    with launchers(tmp_path) as start:
        nodes = [start(args), start(args)]

        def describe() -> str:
            return "\n".join(n.describe() for n in nodes)

        wait_until(lambda: all(metrics_port(n) for n in nodes), 60, "both metrics ports", describe)
        ports = [metrics_port(n) for n in nodes]
        scraped: list[dict] = [{}, {}]

        def in_one_group() -> bool:
            for i, port in enumerate(ports):
                scraped[i] = samples(scrape(port)[1])  # type: ignore[arg-type]
            return all(
                value(s, "rdzv_run_world_size") == 2
                and value(s, "rdzv_launcher_worker_group_state", state="HEALTHY") == 1
                for s in scraped
            ) and progress(tmp_path, 2) is not None

        wait_until(in_one_group, 90, "both nodes training in one group of 2", describe)
        round_before = value(scraped[0], "rdzv_run_round")
        assert round_before is not None and round_before == value(scraped[1], "rdzv_run_round")
        assert value(scraped[0], "rdzv_launcher_restarts_total", cause=MEMBERSHIP) == 0
        assert value(scraped[0], "rdzv_launcher_store_request_seconds_count", backend="etcd", op="announce")
        assert {value(s, "rdzv_launcher_node_rank") for s in scraped} == {0, 1}
        lags = [value(s, "rdzv_launcher_keep_alive_lag_seconds") for s in scraped]
        assert all(lag is not None and 0 <= lag < 3 for lag in lags), lags  # served; below lease_ttl

        survivor, lost = nodes
        lost.kill()  # SIGKILL: the launcher's process group and its workers
        after: dict = {}

        def recovered() -> bool:
            after.update(samples(scrape(ports[0])[1]))  # type: ignore[arg-type]
            return (
                (value(after, "rdzv_run_round") or 0) > round_before
                and value(after, "rdzv_run_world_size") == 1
                and (value(after, "rdzv_launcher_recovery_seconds_count", phase="total", cause=MEMBERSHIP) or 0) >= 1
            )

        wait_until(recovered, 90, "the survivor re-formed alone and runs its workers", describe)
        assert value(after, "rdzv_launcher_restarts_total", cause=MEMBERSHIP) == 1
        assert value(after, "rdzv_launcher_restarts_total", cause=FAILURE) == 0
        for phase in ("stopping", "rendezvous", "starting"):
            assert value(after, "rdzv_launcher_recovery_seconds_count", phase=phase, cause=MEMBERSHIP) == 1, phase
        assert (value(after, "rdzv_launcher_rendezvous_seconds_count") or 0) >= 2
        assert value(after, "rdzv_launcher_worker_group_state", state="HEALTHY") == 1
        assert scrape(ports[0], "/healthz") == (200, "ok\n")
        for phase in ("stopping", "rendezvous", "starting", "total"):
            took = value(after, "rdzv_launcher_recovery_seconds_sum", phase=phase, cause=MEMBERSHIP)
            print(f"[figure] SIGKILL of a node, recovery phase {phase}: {took:.2f} s")

        (tmp_path / "stop").touch()
        assert survivor.wait(60) == 0, describe()


# ------------------------------------------------------------------------------ bad input


def _bad(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "w.py").write_text("open('spawned', 'w').close()\n")
    return subprocess.run(
        [*LAUNCH, "--standalone", *args, "w.py"], capture_output=True, text=True, env=clean_env(**env),
        cwd=tmp_path, timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--metrics-port=65536"], {}, "--metrics-port must be a port number 0..65535"),
        (["--metrics-port=-1"], {}, "--metrics-port must be a port number 0..65535"),
        (["--metrics-port=http"], {}, "'http' is not a valid integer"),
        ([], {"PET_METRICS_PORT": "9x"}, "'9x' is not a valid integer"),
    ],
    ids=["too-high", "negative", "word", "PET_METRICS_PORT"],
)
def test_bad_metrics_port_is_one_line_exit_2(args: list[str], env: dict[str, str], expected: str, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _bad(args, env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rdzv-launch: error: "), proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "spawned").exists()
    assert time.monotonic() - started < 10  # answered before torch loads


def test_metrics_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _bad([f"--metrics-port={port}"], {}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"--metrics-port={port}: cannot listen on 0.0.0.0:{port}" in proc.stderr
    assert not (tmp_path / "spawned").exists()


# ------------------------------------------------------------------------------ the endpoint alone


def test_a_scraper_that_never_reads_does_not_block_updates() -> None:
    endpoint = MetricsEndpoint(0, "stall", "etcd", host="127.0.0.1")
    recorder = endpoint.recorder
    stalled: list[socket.socket] = []
    try:
        # Enough series that one exposition is far more than the socket buffers hold: the
        # stalled scrape's thread blocks in its write, holding whatever it holds.
        for i in range(3000):
            recorder.store_request(f"op{i}", 0.001, None)
        idle = socket.create_connection(("127.0.0.1", endpoint.port))  # connects, sends nothing
        stalled.append(idle)
        for _ in range(2):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", endpoint.port))
            reader.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # ... and never reads the answer
            stalled.append(reader)
        wait_until(lambda: any(t.name.startswith("Thread-") for t in threading.enumerate()), 10, "a request thread")

        done = threading.Event()

        def update() -> None:
            for i in range(20000):
                recorder.store_request("announce", 0.002, None)
                recorder.nodes_waiting(i % 3, GroupCounts(waiting=1))
                recorder.rendezvous_completed(i, 2, 0, 0.5)
            done.set()

        threading.Thread(target=update, daemon=True).start()
        wait_until(done.is_set, 30, "20,000 rounds of metric updates while two scrapes stall")
        status, text = scrape(endpoint.port, timeout=30)
        assert status == 200
        found = samples(text)
        assert value(found, "rdzv_launcher_store_request_seconds_count", backend="etcd", op="announce") == 20000
        assert value(found, "rdzv_run_round") == 19999
        assert scrape(endpoint.port, "/healthz") == (200, "ok\n")
        endpoint.agent_stopped("test over")
        assert scrape(endpoint.port, "/healthz")[0] == 503
    finally:
        for s in stalled:
            s.close()
        endpoint.close()


def test_recovery_phases_and_cause() -> None:
    now = [100.0]
    tracker = RecoveryTracker(clock=lambda: now[0])
    tracker.trouble(FAILURE)  # before workers ever ran: the first formation, no recovery
    assert tracker.current is None
    assert tracker.finish() is None
    tracker.trouble(FAILURE)
    now[0] += 1
    tracker.trouble(MEMBERSHIP)  # the first sign counts
    tracker.rendezvous_started()
    now[0] += 4
    tracker.rendezvous_completed()
    assert tracker.attribute(charged=False) == MEMBERSHIP  # the round refunded the restart
    now[0] += 2
    assert tracker.finish() == (MEMBERSHIP, {"total": 7.0, "stopping": 1.0, "rendezvous": 4.0, "starting": 2.0})
    assert tracker.attribute(None) is None


def test_the_docs_name_every_launcher_metric() -> None:
    from launcher.metrics.prometheus import PrometheusRecorder

    recorder = PrometheusRecorder("docs", "etcd")
    recorder.watch_worker_group(lambda: "HEALTHY")
    recorder.watch_keep_alive(lambda: 0.0)
    served = {family.name + ("_total" if family.type == "counter" else "") for family in recorder.registry.collect()}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    assert served and all(f"`{name}`" in docs for name in served), [n for n in served if f"`{n}`" not in docs]
