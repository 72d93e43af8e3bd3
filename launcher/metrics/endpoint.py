"""`rdzv-launch --metrics-port`: the launcher's recorder and its HTTP endpoint, started together.

`/metrics` is the launcher's private registry (launcher.metrics.prometheus); `/healthz` answers 200 `ok`
while the agent runs and 503 once it has stopped. Without --metrics-port nothing listens and the
agent gets the no-op recorder.
"""

from __future__ import annotations

from launcher.metrics import server
from launcher.metrics.prometheus import PrometheusRecorder
from launcher.problems import UsageProblem

LISTEN_ALL = "0.0.0.0"


class MetricsEndpoint:
    """A running endpoint: `recorder` for the agent, `port` as bound."""

    def __init__(self, port: int, run_id: str, backend: str, host: str = LISTEN_ALL) -> None:
        self.recorder = PrometheusRecorder(run_id, backend)
        self._running = True
        self._why = ""
        try:
            self._server = server.start(host, port, self._health, self.recorder.registry, "rdzv-metrics-http")
        except OSError as exc:
            raise UsageProblem(f"--metrics-port={port}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = self._server.server_port

    def _health(self) -> tuple[bool, str]:
        return (True, "ok") if self._running else (False, f"agent stopped: {self._why}")

    def agent_stopped(self, why: str) -> None:
        self._running, self._why = False, why

    def close(self) -> None:
        self.agent_stopped("exiting")
        server.stop(self._server)
