"""The alert rules and the Grafana dashboard, checked by a real Prometheus.

`promtool check rules` and `promtool test rules` (every alert firing and not firing:
deploy/prometheus/rdzv-alerts.test.yml) on deploy/prometheus/rdzv-alerts.yml; then a real
Prometheus (tests/prometheus_server.py) scrapes `rdzv exporter` and two `rdzv-launch
--metrics-port` nodes through a formation and a node loss, evaluates the rules, and answers every
query of deploy/grafana-rdzv-dashboard.json. Skipped in one line where Prometheus is not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dashboard_queries
import pytest
import yaml
from launcher_helpers import ALLREDUCE_LOOP, Launcher, launchers, progress, write_script
from prometheus_server import PrometheusServer, unavailable_reason
from rdzv_testlib import ROOT, new_run_id
from waiting import wait_until

pytestmark = pytest.mark.timeout(240)

RULES = ROOT / "deploy" / "prometheus" / "rdzv-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rdzv-alerts.test.yml"
OPS = [sys.executable, "-m", "launcher.ops"]
PORT_LINE = re.compile(r"http://[^:/]+:(\d+)/metrics")
WAIT = 90.0


@pytest.fixture(scope="module", autouse=True)
def _prometheus_installed() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent)


def alert_names() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"]]


# ------------------------------------------------------------------------------ the rules file


def test_promtool_checks_the_rules() -> None:
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0 and f"SUCCESS: {len(alert_names())} rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    r = promtool("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for name in alert_names():
        evals = [e for case in cases for e in case["alert_rule_test"] if e["alertname"] == name]
        assert any(e["exp_alerts"] for e in evals), f"{name}: no case where it fires"
        assert any(not e["exp_alerts"] for e in evals), f"{name}: no case where it stays quiet"


def test_a_wrong_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests do test the rules: a threshold changed on purpose makes them fail."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("changes(rdzv_run_round{job=\"rdzv-exporter\"}[30m]) > 5",
                                                                 "changes(rdzv_run_round{job=\"rdzv-exporter\"}[30m]) > 50"))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    r = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and "RdzvRunFlapping" in r.stdout + r.stderr, r.stdout + r.stderr


def test_the_docs_point_to_the_rules_file() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    assert "deploy/prometheus/rdzv-alerts.yml" in docs
    assert all(f"`{name}`" in docs for name in alert_names()), [n for n in alert_names() if f"`{n}`" not in docs]


# ------------------------------------------------------------------------------ a real Prometheus


def metrics_port(proc: Launcher) -> int | None:
    match = PORT_LINE.search(proc.stderr)
    return int(match.group(1)) if match else None


def value(prom: PrometheusServer, expr: str) -> float | None:
    result = prom.query(expr)
    return result[0][1] if len(result) == 1 else None


@pytest.mark.slow
def test_dashboard_and_rules_on_prometheus_scraping_the_exporter_and_two_launchers(etcd35, tmp_path: Path) -> None:
    run_id = new_run_id("prom")
    script = write_script(tmp_path, "loop.py", ALLREDUCE_LOOP)
    dashboard = dashboard_queries.load()
    with launchers(tmp_path) as start:
        exporter = start(["exporter", "--rdzv-endpoint", etcd35.endpoint, "--port", "0", "--host", "127.0.0.1"],
                         cmd=OPS)
        args = [
            "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}",
            f"--rdzv-id={run_id}", "--rdzv-conf=lease_ttl=3,last_call_timeout=3,join_timeout=60",
            "--local-addr=127.0.0.1", "--monitor-interval=0.2", "--max-restarts=2", "--metrics-port=0",
            str(script), str(tmp_path),
        ]
        nodes = [start(args), start(args)]
        procs = [exporter, *nodes]

        def describe() -> str:
            return "\n".join(p.describe() for p in procs)

        wait_until(lambda: all(metrics_port(p) for p in procs), 60, "every metrics port", describe)
        ports = [metrics_port(p) for p in procs]
        jobs = {"rdzv-exporter": [f"127.0.0.1:{ports[0]}"], "rdzv-launch": [f"127.0.0.1:{p}" for p in ports[1:]]}
        with PrometheusServer(jobs, interval="500ms", rule_files=[RULES]) as prom:
            prom.wait_scraped(WAIT)
            # The group of 2 as Prometheus has it, from the exporter and from each launcher.
            wait_until(lambda: value(prom, f'rdzv_run_world_size{{job="rdzv-exporter", run_id="{run_id}"}}') == 2
                       and sorted(v for _, v in prom.query('rdzv_launcher_node_rank{job="rdzv-launch"}')) == [0, 1]
                       and progress(tmp_path, 2) is not None, WAIT, "one group of 2 in Prometheus", describe)
            panels = answers(prom, dashboard)
            assert only(panels, "stat", "Runs") == 1
            # The launchers serve rdzv_run_world_size too: the dashboard counts the exporter's only.
            assert only(panels, "stat", "Nodes in groups") == 2
            assert value(prom, "sum(rdzv_run_world_size)") == 6
            assert only(panels, "stat", "Runs re-forming") == 0
            assert only(panels, "stat", "Corrupt keys") == 0
            assert only(panels, "stat", "Exporter watching") == 1
            row = {ref: only(panels, "table", "Runs", ref) for ref in "ABCDEFGJK"}
            assert row == {"A": 1, "B": 2, "C": 1, "D": 2, "E": 0, "F": 0, "G": 0, "J": 0, "K": 0}
            assert [labels["run_id"] for labels, _ in panels[("table", "Runs", "A")]] == [run_id]

            # A node lost (SIGKILL, launcher and worker): the survivor re-forms alone in round 2.
            round_before = value(prom, f'rdzv_run_round{{job="rdzv-exporter", run_id="{run_id}"}}')
            nodes[1].kill()
            wait_until(lambda: value(prom, f'rdzv_run_round{{job="rdzv-exporter", run_id="{run_id}"}}') == round_before + 1
                       and value(prom, f'rdzv_run_world_size{{job="rdzv-exporter", run_id="{run_id}"}}') == 1,
                       WAIT, "the re-formed round in Prometheus", describe)
            survivor = f"127.0.0.1:{ports[1]}"
            wait_until(lambda: value(prom, f'rdzv_launcher_restarts_total{{instance="{survivor}", cause="membership"}}') == 1,
                       WAIT, "the survivor's membership restart in Prometheus", describe)
            # The dashboard's annotation marks the re-formation; the Round panel steps up.
            annotation = dashboard_queries.expand(dashboard["annotations"]["list"][0]["expr"],
                                                  dashboard_queries.defaults(dashboard))
            assert [s[0]["run_id"] for s in prom.query(annotation)] == [run_id]
            end = prom_time(prom)
            (labels, points), = prom.query_range(expanded(dashboard, "Round", "A"), end - 60, end, 0.5)
            assert labels["run_id"] == run_id and sorted({v for _, v in points})[-2:] == [round_before, round_before + 1]
            # Every rule evaluated without error on the real series.
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            assert sorted(r["name"] for r in rules) == sorted(alert_names())
            wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2") for g in prom.api("rules")["groups"]
                                   for r in g["rules"]), 30, "every rule evaluated")
            assert all(r["health"] == "ok" for g in prom.api("rules")["groups"] for r in g["rules"]), prom.api("rules")
        (tmp_path / "stop").write_text("")
        assert nodes[0].wait(60) == 0, describe()


def expanded(dashboard: dict, title: str, ref: str) -> str:
    for panel, target, expr in dashboard_queries.targets(dashboard):
        if panel["title"] == title and target["refId"] == ref and panel["type"] == "timeseries":
            return expr
    raise KeyError((title, ref))


Answers = dict[tuple[str, str, str], list[tuple[dict[str, str], float]]]


def answers(prom: PrometheusServer, dashboard: dict) -> Answers:
    """Every panel target's instant answer (a PromQL error fails the test), by (type, title, refId)."""
    return {(panel["type"], panel["title"], target["refId"]): prom.query(expr)
            for panel, target, expr in dashboard_queries.targets(dashboard)}


def only(panels: Answers, kind: str, title: str, ref: str = "A") -> float:
    """The value of a target that answers one series (a stat, or a table cell of the one run)."""
    result = panels[(kind, title, ref)]
    assert len(result) == 1, (title, ref, result)
    return result[0][1]


def prom_time(prom: PrometheusServer) -> float:
    return prom.query("time()")[0][1]
