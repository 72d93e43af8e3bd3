"""`rdzv exporter`: Prometheus metrics of every run under a prefix, from ONE watch of the prefix.

The watch folds into an in-memory `rdzv.view.PrefixView`; a custom collector reads that view on
each scrape (no etcd request per scrape, no writes ever). Served by launcher.metrics.server on
`/metrics`, with `/healthz` beside it (200 while the watch runs, 503 while etcd fails).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.metrics import server as metrics_server
from rdzv.backoff import Backoff
from rdzv.etcd import EtcdError
from rdzv.inspect import connect, norm_prefix
from rdzv.keyfeed import KeyFeed
from rdzv.view import PrefixView

log = logging.getLogger("rdzv.exporter")

TICK = 1.0  # seconds the watch loop waits before checking for a stop
MAX_BACKOFF = 10.0  # seconds between re-reads while etcd fails

# Per-run gauges (label run_id): name, help, value from the run's description (None: no sample).
RUN_GAUGES: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("rdzv_run_round", "Number of the latest sealed round (0 before the first).", lambda d: d["round"]),
    ("rdzv_run_world_size", "Nodes in the latest sealed round (the group size).", lambda d: d["world_size"]),
    ("rdzv_run_min_nodes", "min_nodes of the latest sealed round.", lambda d: d["min_nodes"]),
    ("rdzv_run_max_nodes", "max_nodes of the latest sealed round.", lambda d: d["max_nodes"]),
    ("rdzv_run_members", "Members of the sealed round whose node record is still there.",
     lambda d: len(d["members"])),
    ("rdzv_run_lost_members", "Members of the sealed round whose node record is gone (lease expired).",
     lambda d: len(d["lost_members"])),
    ("rdzv_run_nodes_waiting", "Nodes asking for the next round (not members, not spares).",
     lambda d: len(d["waiting"])),
    ("rdzv_run_spares", "Nodes waiting beyond max_nodes while the group is full.", lambda d: len(d["spares"])),
    ("rdzv_run_closed", "1 once the run is closed (ending), else 0.", lambda d: int(d["closed"])),
    ("rdzv_run_corrupt_keys", "Keys of the run that do not hold what the handler writes.",
     lambda d: len(d["corrupt"])),
    ("rdzv_run_last_call_remaining_seconds", "Seconds left of the forming round's last call (0: none).",
     lambda d: d["last_call_left"] or 0.0),
    ("rdzv_run_round_age_seconds",
     "Seconds since the latest round was sealed (a lower bound for rounds sealed before the exporter started).",
     lambda d: d["round_age"]),
    ("rdzv_run_keys", "Keys under the run's prefix.", lambda d: d["keys"]),
    ("rdzv_run_quarantined_nodes", "Hosts of the run in quarantine now (set aside after failing the group "
     "quarantine_after times in a row; 0 again once released or expired).", lambda d: len(d["quarantined"])),
)


class ExporterState:
    """The view and the watch's health, shared by the watch loop and the scrapes."""

    def __init__(self, prefix: str) -> None:
        self.lock = threading.Lock()
        self.view = PrefixView(prefix, time.time())
        self.events = 0
        self.resyncs = 0
        self.revision = 0
        self.synced = False  # a snapshot was read and the watch is open
        self.error = ""  # why etcd last failed ("" while the watch runs)

    def health(self) -> tuple[bool, str]:
        with self.lock:
            if self.synced and not self.error:
                return True, f"ok: {len(self.view.runs)} run(s) at revision {self.revision}"
            return False, f"not watching: {self.error or 'starting'}"


class ViewCollector(Collector):
    """Reads the in-memory view on each scrape."""

    def __init__(self, state: ExporterState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        now = time.time()
        with state.lock:
            runs = {run_id: view.describe(now) for run_id, view in state.view.runs.items()}
            events, resyncs, revision, up = state.events, state.resyncs, state.revision, state.synced and not state.error
        for name, doc, value in RUN_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["run_id"])
            for run_id, desc in sorted(runs.items()):
                sample = value(desc)
                if sample is not None:
                    family.add_metric([run_id], float(sample))
            yield family
        yield GaugeMetricFamily("rdzv_exporter_runs", "Runs under the prefix.", value=len(runs))
        yield CounterMetricFamily("rdzv_exporter_watch_events", "Key events received from the watch.", value=events)
        yield CounterMetricFamily("rdzv_exporter_watch_resyncs",
                                  "Times the prefix was read afresh (watch history compacted, watch cancelled, etcd failing).",
                                  value=resyncs)
        yield GaugeMetricFamily("rdzv_exporter_up", "1 while the watch of the prefix runs, 0 while etcd fails.",
                                value=int(up))
        yield GaugeMetricFamily("rdzv_exporter_revision", "etcd revision of the latest change seen.", value=revision)


def _follow(state: ExporterState, feed: KeyFeed, stop: threading.Event) -> None:
    """Fold the feed into the view until `stop`; etcd failures are retried with backoff."""
    backoff = Backoff(0.5, MAX_BACKOFF)
    started = False
    while not stop.is_set():
        resyncs = feed.resyncs
        try:
            batch = feed.get(TICK) if started else feed.start()
        except EtcdError as exc:
            with state.lock:
                state.error, state.resyncs = str(exc), feed.resyncs
            pause = backoff.pause()
            log.warning("rdzv exporter: %s; reading again in %.1fs", exc, pause)
            stop.wait(pause)
            continue
        live = started and feed.resyncs == resyncs
        started = True
        backoff.reset()
        now = time.time()
        with state.lock:
            for event in batch or ():
                state.view.apply(event, now, live)
            state.events, state.resyncs, state.revision = feed.events, feed.resyncs, feed.revision
            state.synced, state.error = True, ""


def serve(endpoint: str, prefix: str, host: str, port: int, conn: dict[str, Any],
          announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Serve until SIGTERM or Ctrl-C; returns the exit code."""
    state = ExporterState(prefix)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ViewCollector(state))
    server = metrics_server.start(host, port, state.health, registry, "rdzv-exporter-http")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    root = norm_prefix(prefix) + "/"
    announce(f"rdzv exporter: http://{host}:{server.server_port}/metrics for the runs under {root} at {endpoint}")
    try:
        with connect(endpoint, **conn) as client:
            feed = KeyFeed(client, root)
            try:
                _follow(state, feed, stop)
            finally:
                feed.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
        metrics_server.stop(server)
    return 0
