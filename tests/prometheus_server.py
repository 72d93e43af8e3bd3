"""A real Prometheus (Debian's `prometheus` package) for the tests and bench/dashboard_picture.py.

It runs in the foreground on 127.0.0.1 with a configuration and a data dir of its own (a temp
dir, removed by :meth:`PrometheusServer.stop`), scrapes the given targets at a short interval and
loads rule files. Queries go through its HTTP API: what Grafana would get for a panel.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from etcd_harness import free_port
from process_tracking import die_with_parent, drop_data_dir, new_data_dir, track, untrack
from waiting import wait_until


def unavailable_reason() -> str | None:
    """None when prometheus and promtool are installed; else why not, in one line."""
    missing = [b for b in ("prometheus", "promtool") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: apt-get install prometheus"
    return None


class PrometheusError(RuntimeError):
    """Prometheus refused a query (bad PromQL) or did not start."""


class PrometheusServer:
    """``jobs``: scrape job name -> ``host:port`` targets, scraped every ``interval``."""

    def __init__(self, jobs: Mapping[str, Sequence[str]], *, interval: str = "1s",
                 rule_files: Sequence[Path] = ()) -> None:
        self.jobs = {name: list(targets) for name, targets in jobs.items()}
        self.interval = interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.dir = new_data_dir("rdzv-prometheus-")  # removed at exit even if stop() never runs
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                               for name, targets in self.jobs.items()],
        }
        # JSON is YAML: no YAML writer needed.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.port = free_port()
        log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the process
        with log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None)
        track(self.proc)
        try:
            wait_until(self._ready, timeout, "Prometheus ready", self.log_tail)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited ({self.proc.poll()}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the process and remove its config and data. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None:
            untrack(self.proc)
        self.proc = None
        drop_data_dir(self.dir)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "prometheus.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ------------------------------------------------------------------------------ the API

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the answer's ``data``. Raises :class:`PrometheusError` on an error."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series of the vector (a scalar: one, no labels)."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float
                    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """A range query: (labels, [(time, value), ...]) per series."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        return [(s["metric"], [(float(t), float(v)) for t, v in s["values"]]) for s in data["result"]]

    def targets_up(self) -> dict[str, str]:
        """{scrape URL: health} of the active targets ("up", "down", "unknown")."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def wait_scraped(self, timeout: float = 60.0) -> None:
        """Until every target has been scraped successfully at least once."""
        def all_up() -> bool:
            health = self.targets_up()
            return bool(health) and all(h == "up" for h in health.values())

        wait_until(all_up, timeout, "every target scraped", lambda: f"{self.targets_up()}\n{self.log_tail()}", step=0.2)

