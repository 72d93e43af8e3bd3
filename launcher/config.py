"""Turn rdzv-launch's option values into a checked LaunchSettings, or one clear UsageProblem.

One pass, before anything is spawned and, except for the backend-name check (which asks
rdzv.registry), without importing torch, so bad input is answered quickly: every value is parsed
once (single values in `parsers`, the script in `entrypoint`), `--rdzv-conf` is checked once,
here, and the rendezvous is chosen from the parsed values (`rendezvous_choice`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from launcher.entrypoint import resolve_entrypoint
from launcher.health.gate import FIRST_AND_FAILURE, parse_health_check, parse_health_timeout
from launcher.parsers import (
    parse_filters,
    parse_nnodes,
    parse_ranks,
    parse_rdzv_conf,
    parse_signals,
    parse_std,
)
from launcher.problems import UsageProblem
from launcher.rendezvous_choice import resolve_rendezvous
from launcher.settings import LaunchSettings, Notice
from rdzv.rendezvous.quarantine import QuarantinePolicy
from rdzv.rendezvous.segments import check_segment_size
from rdzv.rendezvous.settings import ConfigError, check_config, check_config_key

_DEVICE_WORD_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _logs_specs_exists(name: str) -> bool:
    return any(ep.name == name for ep in metadata.entry_points(group="torchrun.logs_specs"))


def build_settings(v: Mapping[str, Any], given: set[str], pass_local_rank: bool) -> LaunchSettings:
    """Check every option value; `given` names the options set on the command line or by PET_."""
    min_nodes, max_nodes = parse_nnodes(v["nnodes"])
    if v["max_restarts"] < 0:
        raise UsageProblem(f"--max-restarts must be 0 or more, got {v['max_restarts']}")
    if v["monitor_interval"] <= 0:
        raise UsageProblem(f"--monitor-interval must be more than 0, got {v['monitor_interval']}")
    if v["progress_interval"] <= 0:
        raise UsageProblem(f"--progress-interval must be more than 0, got {v['progress_interval']}")
    metrics_port = v.get("metrics_port")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise UsageProblem(f"--metrics-port must be a port number 0..65535 (0: any free port), got {metrics_port}")
    shutdown_timeout = v["shutdown_timeout"]
    if shutdown_timeout is None:
        shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    if shutdown_timeout < 0:
        raise UsageProblem(f"--shutdown-timeout must be 0 or more, got {shutdown_timeout}")
    exit_barrier_timeout = _exit_barrier_timeout(v.get("exit_barrier_timeout", 300.0))
    nproc = v["nproc_per_node"].strip()
    if nproc.isdigit():
        if int(nproc) < 1:
            raise UsageProblem("--nproc-per-node must be at least 1")
    elif not _DEVICE_WORD_RE.match(nproc):
        # Other words are device kinds (a privateuse1 backend's name): torch checks them.
        raise UsageProblem(f"--nproc-per-node must be a number, auto, cpu, gpu or xpu, got {nproc!r}")
    redirects = parse_std(v["redirects"], "--redirects")
    tee = parse_std(v["tee"], "--tee")
    ranks = parse_ranks(v["local_ranks_filter"])
    signals = parse_signals(v["signals_to_handle"])
    if v["logs_specs"] and not _logs_specs_exists(v["logs_specs"]):
        raise UsageProblem(f"--logs-specs: no 'torchrun.logs_specs' entry point named {v['logs_specs']!r}")
    if pass_local_rank and v["no_python"] and not v["run_path"]:
        raise UsageProblem("--no-python cannot pass --local-rank to a program; read LOCAL_RANK from the environment instead")

    health_check = parse_health_check(v.get("health_check"))
    health_timeout = parse_health_timeout(v.get("health_check_timeout", 120.0))
    node_segment = _node_segment(v.get("node_segment"))
    entrypoint, lead_args, name = resolve_entrypoint(v["training_script"], v["module"], v["no_python"], v["run_path"])
    notices: list[Notice] = []
    configs = _checked_rdzv_conf(v["rdzv_conf"], min_nodes, max_nodes)
    rdzv = resolve_rendezvous(v, given, configs, min_nodes, max_nodes, notices)
    if node_segment is not None:
        rdzv.configs["segment"] = node_segment  # the handler reads it from the settings
    return LaunchSettings(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_spec=nproc,
        allow_oversubscribe=bool(v.get("allow_oversubscribe")),
        backend=rdzv.backend,
        endpoint=rdzv.endpoint,
        run_id=rdzv.run_id,
        rdzv_configs=rdzv.configs,
        embedded=rdzv.embedded,
        entrypoint=entrypoint,
        entrypoint_name=name,
        lead_args=lead_args,
        script_args=list(v["training_script_args"]),
        pass_local_rank=pass_local_rank,
        role=v["role"],
        max_restarts=v["max_restarts"],
        monitor_interval=v["monitor_interval"],
        start_method=v["start_method"],
        log_dir=v["log_dir"],
        redirects=redirects,
        tee=tee,
        local_ranks_filter=ranks,
        logs_specs=v["logs_specs"],
        duplicate_stdout_filters=parse_filters(v["duplicate_stdout_filters"]),
        duplicate_stderr_filters=parse_filters(v["duplicate_stderr_filters"]),
        event_log_handler=v["event_log_handler"],
        # torchrun 2.14+: the option wins over the environment variable.
        log_line_prefix_template=v["log_line_prefix_template"]
        or os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
        or None,
        local_addr=v["local_addr"],
        signals_to_handle=signals,
        shutdown_timeout=shutdown_timeout,
        exit_barrier_timeout=exit_barrier_timeout,
        virtual_local_rank=v["virtual_local_rank"],
        numa_binding=v["numa_binding"],
        quiet=v["quiet"],
        log_format=v["log_format"],
        progress_interval=v["progress_interval"],
        metrics_port=metrics_port,
        notices=notices,
        health_check=health_check,
        health_check_timeout=health_timeout,
        health_check_when=v.get("health_check_when") or FIRST_AND_FAILURE,
        node_segment=node_segment,
    )


def _checked_rdzv_conf(conf: str, min_nodes: int, max_nodes: int) -> dict[str, Any]:
    """--rdzv-conf parsed and checked, the one time for a launch: as the handlers check it (unknown
    keys, passwords, numbers), then segment_size and the quarantine settings against --nnodes,
    before the endpoint is probed. The handler is told it was checked (launcher.agent); the
    library and torchrun, which do not come through here, have the handler check it."""
    try:
        configs: dict[str, Any] = parse_rdzv_conf(conf, check_key=check_config_key)
        check_config(configs)
        check_segment_size(configs, min_nodes, max_nodes)
        QuarantinePolicy.from_config(configs)
    except ConfigError as exc:
        raise UsageProblem(f"--rdzv-conf: {exc}") from None
    return configs


def _exit_barrier_timeout(seconds: float) -> float:
    # click reads "nan" and "inf" as floats; neither is a wait anyone means.
    if not 0 <= seconds < math.inf:
        raise UsageProblem(f"--exit-barrier-timeout must be 0 or more seconds, got {seconds:g}")
    return seconds


def _node_segment(text: str | None) -> str | None:
    if text is None:
        return None
    label = text.strip()
    if not label or len(label) > 128 or not label.isprintable():
        raise UsageProblem(f"--node-segment must be 1 to 128 printable characters, got {text!r}")
    return label
