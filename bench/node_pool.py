"""The simulated nodes of bench/formation.py: processes hosting many nodes as threads.

A pool of processes serves run after run (jobs from a queue). For a run with a re-formation,
one more process, started for that run, holds exactly one node: the one the benchmark SIGKILLs
after formation, as a machine that dies. A run goes through stages, each a barrier that the
benchmark process opens (one event per stage, cleared between runs); every process reports on
the results queue after each:

    (job received)  make this process's handlers                     -> "created"
    go              every node calls next_rendezvous()                 -> "formed"
    probe           every node that formed writes probe/<rank> to the round's store -> "probed"
                    (the single-node process then blocks until it is killed)
    killed          survivors notice the loss and call next_rendezvous() again  -> "reformed"
    probe_again     survivors write to the new round's store           -> "probed"
    done            every handler is shut down                         -> "closed"

Survivors notice the loss as torch's elastic agent does: by polling `num_nodes_waiting()` every
`monitor_interval` seconds (one poller per process walks its nodes), or, for handlers whose
`num_nodes_waiting()` never counts a lost member (torch's), they are told at the kill, as their
workers' failing collectives would tell them. The single-node process never waits on a shared
event while it can be killed: a process killed inside a multiprocessing Event's wait would hang
the next set() of that event.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from error_kinds import WarningCounter, describe

STAGES = ("go", "probe", "killed", "probe_again", "done")


@dataclass
class Job:
    kind: str  # "rdzv:etcd", "torch:c10d", ...
    endpoint: str
    run_id: str
    min_nodes: int
    max_nodes: int
    n_local: int
    conf: dict[str, str]
    reform: bool = False  # take part in a re-formation after one node is killed
    notice: str = "poll"  # poll num_nodes_waiting() | told (call next_rendezvous() at the kill)
    monitor_interval: float = 0.1
    victim: bool = False  # the single-node process: blocks after its probe until SIGKILLed
    script: str = "formation"  # or one of bench/lifecycle_nodes.py's SCRIPTS

    @property
    def timeout(self) -> float:
        return float(self.conf.get("_bench_timeout", "120"))


@dataclass
class Report:
    stage: str  # created | formed | probed | reformed | closed
    nodes: int = 0  # nodes of this process taking part in the stage
    seconds: float = 0.0  # created: handler creation
    start: float = 0.0  # formed: the start instant (time.time())
    finishes: list[float] = field(default_factory=list)  # when nodes returned from next_rendezvous()
    noticed: list[float] = field(default_factory=list)  # reformed: when survivors noticed the loss
    errors: list[str] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)
    ok: int = 0  # probed: writes that succeeded
    world_sizes: list[int] = field(default_factory=list)
    ops: tuple[int, int] = (0, 0)  # store writes, reads (backends that count them: our c10d)
    cpu: float = 0.0  # formed: CPU seconds of this process from the start instant to its last node
    module: str = ""  # created: the rdzv package these nodes run


class Stages:
    """One event per stage plus `skip` (no re-formation: the formation failed). Other scripts'
    stages (bench/lifecycle_nodes.py) are added through `names`."""

    def __init__(self, ctx: Any, names: tuple[str, ...] = ()) -> None:
        self.events = {name: ctx.Event() for name in dict.fromkeys((*STAGES, *names, "skip"))}

    def reset(self) -> None:
        for event in self.events.values():
            event.clear()

    def open(self, name: str) -> None:
        self.events[name].set()

    def wait(self, name: str) -> None:
        self.events[name].wait()

    def is_open(self, name: str) -> bool:
        return self.events[name].is_set()


@dataclass
class NodePool:
    ctx: Any
    jobs: Any
    results: Any
    procs: list
    stages: Stages

    @classmethod
    def start(cls, processes: int, names: tuple[str, ...] = ()) -> NodePool:
        ctx = mp.get_context("spawn")
        jobs, results, stages = ctx.Queue(), ctx.Queue(), Stages(ctx, names)
        procs = [ctx.Process(target=_worker, args=(jobs, results, stages), daemon=True) for _ in range(processes)]
        for p in procs:
            p.start()
        return cls(ctx, jobs, results, procs, stages)

    def single_node_process(self, job: Job) -> Any:
        proc = self.ctx.Process(target=_run_job, args=(job, self.results, self.stages), daemon=True)
        proc.start()
        return proc

    def collect(self, stage: str, count: int, timeout: float) -> list[Report]:
        reports: list[Report] = []
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            try:
                report = self.results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise RuntimeError(f"{count - len(reports)} process(es) did not report {stage!r} in {timeout:.0f} s") from None
            if report.stage != stage:
                raise RuntimeError(f"expected {stage!r} from the pool, got {report.stage!r}")
            reports.append(report)
        return reports

    def stop(self) -> None:
        for _ in self.procs:
            self.jobs.put(None)
        for p in self.procs:
            p.join(30)


# ---------------------------------------------------------------------- in the pool processes


def _worker(jobs: Any, results: Any, stages: Stages) -> None:
    """One process hosting many simulated nodes; runs jobs until it gets None."""
    while (job := jobs.get()) is not None:
        _run_job(job, results, stages)


def _run_job(job: Job, results: Any, stages: Stages) -> None:
    warnings = WarningCounter()
    root = logging.getLogger()
    root.addHandler(warnings)
    try:
        if job.script == "formation":
            _stages(job, results, stages, warnings)
        else:
            from lifecycle_nodes import SCRIPTS  # bench/, on the path the spawn inherits

            SCRIPTS[job.script](job, results, stages, warnings)
    finally:
        root.removeHandler(warnings)


def _stages(job: Job, results: Any, stages: Stages, warnings: WarningCounter) -> None:
    # Imports first: a fresh process spends a second importing torch, which is not creation.
    import torch.distributed.elastic.rendezvous  # noqa: F401

    import rdzv.registry  # noqa: F401

    t0 = time.monotonic()
    handlers, errors = _create(job)
    created = time.monotonic() - t0
    # Garbage of earlier runs in this process (its handlers, their threads' frames): a full
    # collection of it landing inside the next window would be charged to that run.
    gc.collect()
    rdzv = sys.modules.get("rdzv")
    results.put(Report("created", len(handlers), seconds=created, errors=errors,
                       module=str(getattr(rdzv, "__file__", "") or "")))
    stages.wait("go")
    start = time.time()
    cpu_start = time.process_time()
    infos, finishes, join_errors = _join_all(handlers, time.monotonic() + job.timeout)
    ops = [0, 0]
    for h in handlers:
        counts = getattr(getattr(h, "backend", None), "counts", None)
        if counts is not None:
            ops[0] += counts.writes
            ops[1] += counts.reads
    cpu = time.process_time() - cpu_start  # every thread of this process, background ones too
    results.put(Report("formed", len(handlers), start=start, finishes=finishes, errors=join_errors,
                       warnings=warnings.take(), ops=(ops[0], ops[1]), cpu=cpu,
                       world_sizes=[_world_size(i) for i in infos if i is not None]))
    stages.wait("probe")
    _report_probes("probe", infos, job.timeout, results, warnings)
    if job.victim:
        threading.Event().wait()  # SIGKILLed here, waiting on nothing shared
    stages.wait("killed")
    survivors = [h for h, info in zip(handlers, infos, strict=True) if info is not None]
    new_infos: list = []
    if job.reform and survivors and not stages.is_open("skip"):
        new_infos, finishes, noticed, errors = _reform(job, survivors, time.monotonic() + job.timeout)
        results.put(Report("reformed", len(survivors), finishes=finishes, noticed=noticed, errors=errors,
                           warnings=warnings.take(),
                           world_sizes=[_world_size(i) for i in new_infos if i is not None]))
    else:
        results.put(Report("reformed", 0))
    stages.wait("probe_again")
    _report_probes("probe again", new_infos, job.timeout, results, warnings)
    stages.wait("done")
    closers = [threading.Thread(target=_shutdown, args=(h,), daemon=True) for h in handlers]
    for t in closers:
        t.start()
    for t in closers:
        t.join(10)
    results.put(Report("closed", len(handlers), warnings=warnings.take()))


def _create(job: Job) -> tuple[list, list[str]]:
    handlers: list = []
    errors: list[str] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            h = _make_handler(job)
            with lock:
                handlers.append(h)
        except Exception as exc:  # noqa: BLE001 - recorded as the run's failure
            with lock:
                errors.append(describe(exc))

    _run_threads([create] * job.n_local, None)
    return handlers, errors


def _make_handler(job: Job):  # noqa: ANN202 - returns torch's RendezvousHandler
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    source, name = job.kind.split(":", 1)
    # `_bench_*` keys are the benchmark's own; handlers refuse keys they do not know.
    conf = {k: v for k, v in job.conf.items() if not k.startswith("_bench")}
    params = RendezvousParameters(name, job.endpoint, job.run_id, job.min_nodes, job.max_nodes, **conf)
    if source == "rdzv":
        from rdzv import create_handler

        handler = create_handler(params)
        metrics = job.conf.get("_bench_metrics")  # bench/metrics_overhead.py: off | on
        return handler if metrics is None else _launcher_path(handler, job.run_id, metrics == "on")
    from torch.distributed.elastic.rendezvous import registry

    return registry.handler_registry.create_handler(params)


def _launcher_path(handler, run_id: str, metrics: bool):  # noqa: ANN001, ANN202
    """The handler as rdzv-launch wraps it (launcher.progress), with its metrics recorder or none."""
    from launcher.metrics.prometheus import PrometheusRecorder
    from launcher.metrics.recorder import NULL_RECORDER
    from launcher.progress import ReportingHandler
    from launcher.report import Reporter

    recorder = PrometheusRecorder(run_id, "etcd") if metrics else NULL_RECORDER
    if metrics:
        handler.observe_backend(recorder)
    reporter = Reporter("bench", "text", True)
    return ReportingHandler(handler, reporter, 5.0, 1, 1, "bench", recorder)


def _join_all(handlers: list, deadline: float) -> tuple[list, list[float], list[str]]:
    """Every handler calls next_rendezvous() at once: (infos or None, finish times, errors)."""
    infos: list = [None] * len(handlers)
    finishes: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def join(i: int) -> None:
        try:
            info = handlers[i].next_rendezvous()
            with lock:
                infos[i] = info
                finishes.append(time.time())
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(describe(exc))

    alive = _run_threads([lambda i=i: join(i) for i in range(len(handlers))], deadline)
    if alive:
        errors.append(f"{alive} node(s) still waiting at the timeout")
    return infos, finishes, errors


def _reform(job: Job, handlers: list, deadline: float) -> tuple[list, list[float], list[float], list[str]]:
    """Survivors notice the loss and rejoin: (infos, finish times, notice times, errors)."""
    infos: list = [None] * len(handlers)
    finishes: list[float] = []
    noticed: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    threads: list[threading.Thread] = []

    def rejoin(i: int) -> None:
        try:
            info = handlers[i].next_rendezvous()
            with lock:
                infos[i] = info
                finishes.append(time.time())
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(describe(exc))

    def start(i: int) -> None:
        noticed.append(time.time())
        t = threading.Thread(target=rejoin, args=(i,), daemon=True)
        t.start()
        threads.append(t)

    pending = list(range(len(handlers)))
    if job.notice == "told":
        for i in pending:
            start(i)
        pending = []
    while pending and time.monotonic() < deadline:
        still = []
        for i in pending:
            try:
                waiting = handlers[i].num_nodes_waiting()
            except Exception as exc:  # noqa: BLE001 - torch's agent would stop on it
                errors.append(describe(exc))
                continue
            if waiting > 0:
                start(i)
            else:
                still.append(i)
        pending = still
        if pending:
            time.sleep(job.monitor_interval)
    if pending:
        errors.append(f"{len(pending)} survivor(s) never saw the loss (num_nodes_waiting() stayed 0)")
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.1))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        errors.append(f"{alive} node(s) still waiting at the timeout")
    with lock:
        return list(infos), list(finishes), noticed, list(errors)


def _report_probes(stage: str, infos: list, timeout: float, results: Any, warnings: WarningCounter) -> None:
    """Each node that formed writes probe/<rank> to its round's store, once, at the same time."""
    formed = [i for i in infos if i is not None]
    ok = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def probe(info) -> None:  # noqa: ANN001
        try:
            store, rank = _store_and_rank(info)
            store.set(f"probe/{rank}", b"1")
            with lock:
                ok[0] += 1
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(describe(exc))

    alive = _run_threads([lambda info=info: probe(info) for info in formed], time.monotonic() + timeout)
    if alive:
        errors.append(f"{alive} write(s) still unanswered at the timeout")
    results.put(Report("probed", len(formed), ok=ok[0], errors=errors, warnings=warnings.take()))


def _store_and_rank(info) -> tuple[Any, int]:  # noqa: ANN001 - RendezvousInfo, or torch < 2.4's tuple
    if hasattr(info, "store"):
        return info.store, info.rank
    return info[0], info[1]


def _world_size(info) -> int:  # noqa: ANN001
    return int(info.world_size if hasattr(info, "world_size") else info[2])


def _run_threads(targets: list[Callable[[], None]], deadline: float | None) -> int:
    """Run each target in a thread of its own; the number still running at the deadline."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(None if deadline is None else max(deadline - time.monotonic(), 0.1))
    return sum(t.is_alive() for t in threads)


def _shutdown(handler) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):
        handler.shutdown()
