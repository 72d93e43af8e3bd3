"""rdzv-launch's Prometheus metrics: one private registry per launcher, fed by a `Recorder`.

Names shared with `rdzv exporter` (`rdzv_run_*`, label `run_id`) mean the same there and here,
seen from this node; the rest (`rdzv_launcher_*`) only a launcher knows. Updates are
prometheus_client's own (a short lock per value, never held across I/O); the worker group's
state is read when a scrape collects it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from launcher.metrics.recorder import CAUSES, PHASES, RecoveryTracker
from rdzv.rendezvous.membership import GroupCounts
from rdzv.rendezvous.observed import REQUESTS

# torch's WorkerState names (torch.distributed.elastic.agent.server.api).
WORKER_STATES = ("UNKNOWN", "INIT", "HEALTHY", "UNHEALTHY", "STOPPED", "SUCCEEDED", "FAILED")
RENDEZVOUS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerGroupCollector(Collector):
    """`rdzv_launcher_worker_group_state`: 1 for the state the group is in, 0 for the others."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self.source: Callable[[], str] | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rdzv_launcher_worker_group_state",
            "State of this node's worker group (torch's WorkerState): 1 for the current one.",
            labels=["run_id", "state"],
        )
        source = self.source
        if source is not None:
            current = source()
            for state in WORKER_STATES:
                family.add_metric([self._run_id, state], float(state == current))
        yield family


class KeepAliveCollector(Collector):
    """`rdzv_launcher_keep_alive_lag_seconds`, read from the handler when collected; absent
    where the backend cannot tell (etcd-v2, c10d, static)."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self.source: Callable[[], float | None] | None = None

    def collect(self) -> Iterator[Metric]:
        source = self.source
        lag = source() if source is not None else None
        if lag is None:
            return
        family = GaugeMetricFamily(
            "rdzv_launcher_keep_alive_lag_seconds",
            "How long this node's oldest unanswered etcd lease keep-alive has waited (0: all answered).",
            labels=["run_id"],
        )
        family.add_metric([self._run_id], lag)
        yield family


class PrometheusRecorder:
    """A `launcher.metrics.recorder.Recorder` that keeps Prometheus metrics in `self.registry`."""

    def __init__(self, run_id: str, backend: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        reg, run = self.registry, ["run_id"]
        self._recovery = RecoveryTracker()
        self._states = WorkerGroupCollector(run_id)
        reg.register(self._states)
        self._keep_alive = KeepAliveCollector(run_id)
        reg.register(self._keep_alive)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, run, registry=reg).labels(run_id)

        self.round = gauge("rdzv_run_round", "Round this node last joined (0 before the first).")
        self.world_size = gauge("rdzv_run_world_size", "Nodes in the round this node last joined (the group size).")
        self.waiting = gauge("rdzv_run_nodes_waiting", "Nodes outside the group asking to join it (not spares), as this node sees them.")
        self.spares = gauge("rdzv_run_spares", "Nodes waiting beyond max_nodes while the group is full, as this node sees them.")
        self.lost = gauge("rdzv_run_lost_members", "Members of this node's round whose record is gone (left or lease expired).")
        self.node_rank = gauge("rdzv_launcher_node_rank", "This node's rank in its round (-1 before the first).")
        self.node_rank.set(-1)
        self.restart_pending = gauge(
            "rdzv_launcher_nodes_waiting",
            "torch's num_nodes_waiting(): above 0, the agent restarts its workers for a new round.",
        )
        self.rendezvous = Histogram(
            "rdzv_launcher_rendezvous_seconds", "Time in next_rendezvous(), every formation and re-formation.",
            run, buckets=RENDEZVOUS_BUCKETS, registry=reg,
        ).labels(run_id)
        self.recovery = Histogram(
            "rdzv_launcher_recovery_seconds",
            "Phases of a recovery: stopping (trouble seen -> rendezvous started), rendezvous "
            "(-> completed), starting (-> workers running), total.",
            [*run, "phase", "cause"], buckets=RENDEZVOUS_BUCKETS, registry=reg,
        )
        self.restarts = Counter(
            "rdzv_launcher_restarts", "Worker group restarts by cause: failure (counted) or membership.",
            [*run, "cause"], registry=reg,
        )
        self.health_failures = Counter(
            "rdzv_launcher_health_check_failures", "--health-check runs that failed or timed out on this node.",
            run, registry=reg,
        ).labels(run_id)
        self.requests = Histogram(
            "rdzv_launcher_store_request_seconds", "Requests of the rendezvous to its store (etcd), by operation.",
            [*run, "backend", "op"], buckets=REQUEST_BUCKETS, registry=reg,
        )
        self.request_errors = Counter(
            "rdzv_launcher_store_request_errors", "Requests of the rendezvous to its store that failed, by operation.",
            [*run, "backend", "op"], registry=reg,
        )
        self._run_id, self._backend = run_id, backend
        # Children made now, off the formation path: a request then costs one dict lookup and one observe.
        self._per_op = {op: self.requests.labels(run_id, backend, op) for op in REQUESTS}
        for op in REQUESTS:
            self.request_errors.labels(run_id, backend, op)
        for cause in CAUSES:  # present at 0 from the start: rate() and increase() see the first one
            self.restarts.labels(run_id, cause)
            for phase in PHASES:
                self.recovery.labels(run_id, phase, cause)

    # ------------------------------------------------------------ Recorder
    def rendezvous_started(self) -> None:
        self._recovery.rendezvous_started()

    def rendezvous_completed(self, round_no: int | None, group_size: int, node_rank: int, seconds: float) -> None:
        self._recovery.rendezvous_completed()
        self.rendezvous.observe(seconds)
        if round_no is not None:
            self.round.set(round_no)
        self.world_size.set(group_size)
        self.node_rank.set(node_rank)
        for g in (self.waiting, self.spares, self.lost, self.restart_pending):
            g.set(0)

    def nodes_waiting(self, waiting: int, counts: GroupCounts | None) -> None:
        self.restart_pending.set(waiting)
        if counts is not None:
            self.waiting.set(counts.waiting)
            self.spares.set(counts.spares)
            self.lost.set(counts.lost)
        else:
            self.waiting.set(waiting)

    def trouble(self, cause: str) -> None:
        self._recovery.trouble(cause)

    def restart_attributed(self, charged: bool | None) -> None:
        cause = self._recovery.attribute(charged)
        if cause is not None:
            self.restarts.labels(self._run_id, cause).inc()

    def workers_running(self) -> None:
        finished = self._recovery.finish()
        if finished is None:
            return
        cause, phases = finished
        for phase, seconds in phases.items():
            self.recovery.labels(self._run_id, phase, cause).observe(max(seconds, 0.0))

    def health_check_failed(self) -> None:
        self.health_failures.inc()

    def store_request(self, op: str, seconds: float, error: BaseException | None) -> None:
        child = self._per_op.get(op)
        if child is None:
            child = self._per_op[op] = self.requests.labels(self._run_id, self._backend, op)
        child.observe(seconds)
        if error is not None:
            self.request_errors.labels(self._run_id, self._backend, op).inc()

    def watch_worker_group(self, state: Callable[[], str]) -> None:
        self._states.source = state

    def watch_keep_alive(self, lag: Callable[[], float | None]) -> None:
        self._keep_alive.source = lag
