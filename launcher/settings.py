"""What rdzv-launch runs with, once every option is checked (`launcher.config.build_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Notice:
    """Something the launcher says before it starts (an option ignored, a run id generated):
    `event` names it in the structured log, `fields` go with it."""

    event: str
    message: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class LaunchSettings:
    """rdzv-launch's checked options. Fields named like an option hold its checked value (torchrun's
    meaning); the comments explain the others and those whose form differs from the option's."""

    min_nodes: int  # --nnodes=MIN[:MAX]
    max_nodes: int
    nproc_spec: str  # --nproc-per-node: a count, or a device word torch resolves (auto, gpu, ...)
    allow_oversubscribe: bool
    backend: str  # the rendezvous backend chosen (c10d when embedded, static without an endpoint)
    endpoint: str
    run_id: str  # given, or generated for a single-node run
    rdzv_configs: dict[str, Any]  # --rdzv-conf, checked, plus what the launcher adds (timeout, rank)
    embedded: bool  # an embedded c10d rendezvous on this node (--standalone, or one node without an endpoint)
    entrypoint: str | None  # a program to exec; None means runpy in a worker (--run-path)
    entrypoint_name: str  # the script's or module's name, for messages
    lead_args: list[str]  # interpreter flags and the script, before --local-rank and SCRIPT_ARGS
    script_args: list[str]
    pass_local_rank: bool  # pass --local-rank=N to the script (--legacy-local-rank, launcher.legacy)
    role: str
    max_restarts: int
    monitor_interval: float
    start_method: str
    log_dir: str | None
    redirects: str  # 0-3, or a per-rank map like 0:1,1:2
    tee: str  # as redirects
    local_ranks_filter: set[int] | None  # None: every local rank
    logs_specs: str | None  # a 'torchrun.logs_specs' entry point name
    duplicate_stdout_filters: list[str]
    duplicate_stderr_filters: list[str]
    event_log_handler: str
    log_line_prefix_template: str | None  # the option, else TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE
    local_addr: str | None
    signals_to_handle: str  # comma-separated signal names, each checked
    shutdown_timeout: int  # seconds; the option, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30)
    virtual_local_rank: bool
    numa_binding: str | None
    quiet: bool
    log_format: str
    progress_interval: float  # seconds between progress lines while waiting for a round
    exit_barrier_timeout: float = 300.0  # seconds; torch's agent's default
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    health_check: list[str] | None = None  # --health-check as a command (launcher.health.gate); None: off
    health_check_timeout: float = 120.0
    health_check_when: str = "first-and-failure"  # or every-join (launcher.health.gate.WHEN)
    node_segment: str | None = None  # --node-segment; None: NVML's cluster UUID where it has one
    notices: list[Notice] = field(default_factory=list)  # to print once logging is set up
