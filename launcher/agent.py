"""Build torch's LocalElasticAgent around one of our rendezvous handlers and run it.

Process supervision, restarts, log redirects and error files are torch's; this module only wires
the launcher's settings into `RendezvousParameters` -> handler -> `WorkerSpec` -> agent, the way
torch's own `launch_agent` does, and turns the outcome into an exit code.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import warnings
from typing import TYPE_CHECKING, Any

from launcher.devices import check_oversubscription, resolve_nproc
from launcher.problems import LaunchFailed, UsageProblem
from launcher.report import Reporter, ReporterLogHandler
from launcher.settings import LaunchSettings, Notice

if TYPE_CHECKING:
    from launcher.metrics.endpoint import MetricsEndpoint

# torchrun's words, on one line.
OMP_NOTICE = (
    "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid "
    "your system being overloaded, please further tune the variable for optimal performance in "
    "your application as needed."
)


def prepare_logging(reporter: Reporter) -> None:
    """Route torch's elastic logs and our handlers' through our reporter; call before torch.distributed.elastic is imported.

    torch's default log formatter imports torch._dynamo (over a second) on the first warning; a
    plain handler keeps warnings (restarts, failures) from costing that. torchrun.handlers plugins
    are not used by rdzv-launch (backends come from rdzv.registry), so a broken one is not worth
    a traceback here.
    """
    # Our handlers' warnings (lease lapsed, heartbeat failed, ...) too: with --log-format json,
    # a bare line would break the stream.
    for name in ("torch.distributed.elastic", "rdzv"):
        logger = logging.getLogger(name)
        logger.addHandler(ReporterLogHandler(reporter))
        logger.propagate = False
    logging.getLogger("torch.distributed.elastic.rendezvous.registry").setLevel(logging.ERROR)


def import_torch() -> list[Notice]:
    """Load torch's elastic package, holding back the warnings torch prints on import (e.g.
    "Failed to initialize NumPy") as notices: bad input stays one line, JSON lines stay JSON."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch.distributed.elastic.agent.server  # noqa: F401
    # torch's modules are ~170k tracked objects that live as long as the process: keep the garbage
    # collector from scanning them again in every full collection and once more at exit (the
    # exit alone cost ~0.4 s of CPU, a fifth of a launcher's, and many seconds on a crowded
    # machine: 100 launchers on 2 cores).
    gc.freeze()
    return [Notice("torch_import", f"torch: {w.category.__name__}: {w.message}", "warning") for w in caught]


def _with_hostname(template: str | None) -> str | None:
    # torch substitutes ${hostname} itself from 2.14 on; before, it would stay literal.
    return template.replace("${hostname}", socket.gethostname()) if template else None


def _make_logs_specs(s: LaunchSettings) -> Any:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std

    cls: Any = DefaultLogsSpecs
    if s.logs_specs:
        from importlib import metadata

        (entry,) = [ep for ep in metadata.entry_points(group="torchrun.logs_specs") if ep.name == s.logs_specs]
        cls = entry.load()
    return cls(
        log_dir=s.log_dir,
        redirects=Std.from_str(s.redirects),
        tee=Std.from_str(s.tee),
        local_ranks_filter=s.local_ranks_filter,
    )


def _numa_options(mode: str | None) -> Any:
    if mode is None:
        return None
    from torch.numa.binding import AffinityMode, NumaOptions

    return NumaOptions(affinity_mode=AffinityMode(mode))


def _check_event_handler(name: str) -> None:
    from torch.distributed.elastic.events.handlers import get_logging_handler

    try:
        get_logging_handler(name)
    except KeyError:
        raise UsageProblem(f"--event-log-handler: unknown handler {name!r} (null, console or dynamic_rendezvous)") from None


def _start_metrics(s: LaunchSettings) -> MetricsEndpoint | None:
    """The --metrics-port endpoint (launcher.metrics.endpoint), listening; None when off."""
    if s.metrics_port is None:
        return None
    from launcher.metrics.endpoint import MetricsEndpoint

    return MetricsEndpoint(s.metrics_port, s.run_id, s.backend)


def _create_handler(params: Any, s: LaunchSettings) -> Any:
    """Our handler for `params`; what it rejects becomes one line for the user."""
    from torch.distributed.elastic.rendezvous import RendezvousError

    from rdzv.registry import create_handler

    try:
        # --rdzv-conf was checked in the launcher's one pass (launcher.config); what the launcher
        # added since (timeout, rank, local_world_size, segment) it made valid itself.
        return create_handler(params, config_checked=True)
    except (ValueError, TypeError, KeyError) as exc:
        # Settings the handler rejects (rdzv-conf values and the like).
        raise UsageProblem(f"{s.backend} rendezvous: {exc}") from None
    except RendezvousError:
        raise
    except Exception as exc:
        raise LaunchFailed(f"cannot set up the {s.backend} rendezvous at {s.endpoint}: {type(exc).__name__}: {exc}") from None


def launch(s: LaunchSettings, reporter: Reporter) -> None:
    """Run the job on this node. Raises ChildFailedError, SignalException or a rendezvous error."""
    nproc = resolve_nproc(s.nproc_spec)
    check_oversubscription(nproc, s.nproc_spec, s.allow_oversubscribe)
    from torch.distributed.elastic import events, metrics
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.utils import macros

    from launcher import torch_compat
    from launcher.elastic_agent import RdzvAgent
    from launcher.metrics.recorder import NULL_RECORDER, Recorder
    from launcher.progress import ReportingHandler

    _check_event_handler(s.event_log_handler)
    try:
        logs_specs = _make_logs_specs(s)
    except ValueError as exc:
        raise UsageProblem(f"--redirects/--tee: {exc}") from None
    numa = _numa_options(s.numa_binding)

    args = list(s.lead_args)
    if s.pass_local_rank:
        args.append(f"--local-rank={macros.local_rank}")
    args.extend(s.script_args)
    entrypoint: Any = s.entrypoint
    if entrypoint is None:
        from launcher.runpath import run_script_path

        entrypoint = run_script_path

    # Handlers that publish node details (ours, for `rdzv status`, and to tell whether every node
    # runs the same workers) read these; others ignore them.
    configs = {"local_world_size": nproc, "role": s.role, **s.rdzv_configs}
    if "segment" not in configs and not s.embedded:
        from launcher.nvlink import nvlink_segment

        label = nvlink_segment()
        if label is not None:
            configs["segment"] = label
            s.notices.append(Notice("node_segment", f"node segment {label} (the GPUs' NVLink cluster UUID)"))
    params = RendezvousParameters(
        backend=s.backend,
        endpoint=s.endpoint,
        run_id=s.run_id,
        min_nodes=s.min_nodes,
        max_nodes=s.max_nodes,
        local_addr=s.local_addr,
        **configs,
    )
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = s.signals_to_handle
    # Listening before the handler exists: a port in use is bad input, and nothing is written yet.
    endpoint = _start_metrics(s)
    recorder: Recorder = endpoint.recorder if endpoint is not None else NULL_RECORDER
    try:
        handler = _create_handler(params, s)
    except BaseException:
        if endpoint is not None:
            endpoint.close()  # an in-process caller goes on: free the port
        raise
    # The handler holds the etcd password now; workers must not inherit it (/proc/<pid>/environ).
    os.environ.pop(str(s.rdzv_configs.get("password_env") or "RDZV_ETCD_PASSWORD"), None)

    # Input is good (the handler accepted its settings): from here on the user hears what is
    # happening.
    for notice in [*s.notices, *torch_compat.unhonoured_options(s, torch_compat.features())]:
        reporter.emit(notice.event, notice.message, notice.level, **notice.fields)
    if endpoint is not None:
        observe = getattr(handler, "observe_backend", None)
        if callable(observe):
            observe(recorder)  # our handlers: every store request timed
        lag = getattr(handler, "keep_alive_lag", None)
        if callable(lag):
            recorder.watch_keep_alive(lag)
        reporter.info(
            "metrics", f"metrics at http://{endpoint.host}:{endpoint.port}/metrics (and /healthz)", port=endpoint.port
        )
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        # Same default and notice as torchrun; workers inherit it from here.
        os.environ["OMP_NUM_THREADS"] = "1"
        # torchrun's words, but information, not a warning: nothing is wrong.
        reporter.info("omp_num_threads", OMP_NOTICE)
    where = f"{s.backend} at {s.endpoint}"
    reporting = ReportingHandler(handler, reporter, s.progress_interval, s.min_nodes, s.max_nodes, where, recorder)

    features = torch_compat.features()
    # Fields this torch lacks are left out (unhonoured_options said so above).
    spec = torch_compat.worker_spec(
        features,
        role=s.role,
        local_world_size=nproc,
        entrypoint=entrypoint,
        args=tuple(args),
        rdzv_handler=reporting,
        max_restarts=s.max_restarts,
        monitor_interval=s.monitor_interval,
        # MASTER_ADDR/MASTER_PORT come from the handler (static: the store at --master-port).
        master_addr=None,
        master_port=None,
        local_addr=s.local_addr,
        event_log_handler=s.event_log_handler,
        numa_options=numa,
        duplicate_stdout_filters=s.duplicate_stdout_filters or None,
        duplicate_stderr_filters=s.duplicate_stderr_filters or None,
        virtual_local_rank=s.virtual_local_rank,
    )
    health = None
    if s.health_check is not None:
        from launcher.health.gate import EVERY_JOIN, HealthGate

        health = HealthGate(
            s.health_check, s.health_check_timeout, reporter,
            every_join=s.health_check_when == EVERY_JOIN, on_failure=recorder.health_check_failed,
        )
    agent = RdzvAgent(
        spec=spec,
        health=health,
        logs_specs=logs_specs,
        start_method=s.start_method,
        log_line_prefix_template=_with_hostname(s.log_line_prefix_template),
        shutdown_timeout=s.shutdown_timeout,
        exit_barrier_timeout=s.exit_barrier_timeout,
        signals_to_handle=s.signals_to_handle,
        reporter=reporter,
        progress_interval=s.progress_interval,
        recorder=recorder,
    )
    reporter.info(
        "starting",
        f"{nproc} worker(s) of {s.entrypoint_name} per node, {s.backend} rendezvous {s.run_id}"
        + ("" if s.embedded else f" at {s.endpoint}")
        + f", nodes {s.min_nodes}" + ("" if s.min_nodes == s.max_nodes else f" to {s.max_nodes}"),
        run_id=s.run_id,
        backend=s.backend,
        endpoint=s.endpoint,
        nproc_per_node=nproc,
        min_nodes=s.min_nodes,
        max_nodes=s.max_nodes,
    )

    # As torch's launch_agent: close the rendezvous when done, except after a signal, which
    # would close this run id for good and stop the remaining nodes from re-forming. Then the
    # node only leaves (ours: it withdrew already; the last node out still removes the keys).
    shutdown_rdzv = True
    try:
        metrics.initialize_metrics(metrics.MetricsConfig())
        result = agent.run()
        if result is None:
            # RendezvousGracefulExitError: this node was a spare beyond --nnodes MAX.
            reporter.info("not_needed", "the group formed without this node (spare beyond max nodes); exiting")
            return
        events.record(agent.get_event_succeeded(), s.event_log_handler)
        if result.is_failed():
            raise ChildFailedError(name=s.entrypoint_name, failures=result.failures)
        reporter.info("succeeded", f"all workers of {s.entrypoint_name} finished")
    except ChildFailedError:
        raise
    except SignalException:
        # Stopped while waiting for the others to finish, the node is done: it closes the run
        # as a finished node does (the run ends, the others' finishing workers are not restarted).
        shutdown_rdzv = agent.workers_succeeded
        events.record(agent.get_event_failed(), s.event_log_handler)
        raise
    except Exception:
        events.record(agent.get_event_failed(), s.event_log_handler)
        raise
    finally:
        if endpoint is not None:
            endpoint.agent_stopped("the launcher is ending")
        leave = getattr(handler, "leave", None)
        end = handler.shutdown if shutdown_rdzv else leave if callable(leave) else None
        if end is not None:
            end_rendezvous(end, reporter)


SHUTDOWN_WAIT = 60.0  # seconds a node's close and leave may take before the launcher exits anyway


def end_rendezvous(end: Any, reporter: Reporter) -> None:
    """Close or leave the rendezvous, within SHUTDOWN_WAIT: the job's outcome is known, and a
    store that stopped answering must not keep a finished node running (its keys go with its
    lease). Failures are one warning line, as in torch 2.14+."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            end()
        except Exception as exc:  # reported below
            failed.append(exc)

    thread = threading.Thread(target=run, name="rdzv-shutdown", daemon=True)
    thread.start()
    thread.join(SHUTDOWN_WAIT)
    if thread.is_alive():
        reporter.warning("shutdown_failed", f"could not close the rendezvous within {SHUTDOWN_WAIT:g} s; exiting anyway")
    elif failed:
        exc = failed[0]
        reporter.warning("shutdown_failed", f"could not close the rendezvous: {type(exc).__name__}: {exc}")
