"""Turn rdzv-launch's option values into a checked LaunchSettings, or one clear UsageProblem.

Everything here runs before anything is spawned and, except for the backend-name check (which
asks rdzv.registry), without importing torch, so bad input is answered quickly.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from importlib.machinery import PathFinder
from typing import Any

# Torch-free: run ids, --rdzv-conf and endpoints are checked by the same code as in the handlers.
from rdzv.rendezvous.settings import (
    ConfigError,
    check_config,
    check_config_key,
    check_run_id,
    split_endpoint,
    split_endpoint_list,
)

DEFAULT_PORTS = {"etcd": 2379, "etcd-v2": 2379, "c10d": 29400}
DEFAULT_MASTER_PORT = 29500
# torchrun's rendezvous timeout when --rdzv-conf does not set one.
DEFAULT_RDZV_TIMEOUT = 900
EMBEDDED_ENDPOINT = "localhost:0"
_DEVICE_WORD_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_STD_RE = re.compile(r"^[0-3]$|^\d+:[0-3](,\d+:[0-3])*$")


class UsageProblem(Exception):
    """Bad input: reported as one line with exit code 2, before anything is spawned."""


class LaunchFailed(Exception):
    """A failure that is not the user's input (e.g. the backend cannot be set up): one line, exit 1."""


@dataclass
class Notice:
    event: str
    message: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class LaunchSettings:
    min_nodes: int
    max_nodes: int
    nproc_spec: str
    allow_oversubscribe: bool
    backend: str
    endpoint: str
    run_id: str
    rdzv_configs: dict[str, Any]
    embedded: bool
    entrypoint: str | None  # a program to exec; None means runpy in a worker (--run-path)
    entrypoint_name: str
    lead_args: list[str]  # interpreter flags and the script, before --local-rank and SCRIPT_ARGS
    script_args: list[str]
    pass_local_rank: bool
    role: str
    max_restarts: int
    monitor_interval: float
    start_method: str
    log_dir: str | None
    redirects: str
    tee: str
    local_ranks_filter: set[int] | None
    logs_specs: str | None
    duplicate_stdout_filters: list[str]
    duplicate_stderr_filters: list[str]
    event_log_handler: str
    log_line_prefix_template: str | None
    local_addr: str | None
    signals_to_handle: str
    shutdown_timeout: int
    virtual_local_rank: bool
    numa_binding: str | None
    quiet: bool
    log_format: str
    progress_interval: float
    metrics_port: int | None = None
    notices: list[Notice] = field(default_factory=list)


# ---------------------------------------------------------------- small parsers


def parse_nnodes(text: str) -> tuple[int, int]:
    parts = text.strip().split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageProblem(f"--nnodes must be N or MIN:MAX with whole numbers, got {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise UsageProblem(f"--nnodes={text}: the minimum number of nodes must be at least 1")
    if lo > hi:
        raise UsageProblem(f"--nnodes={text}: MIN ({lo}) is greater than MAX ({hi})")
    return lo, hi


def parse_rdzv_conf(text: str, check_key: Callable[[str], None] | None = None) -> dict[str, str]:
    """`k=v,k=v` as torch reads it (values stay strings), with a message naming the bad item.
    Once every item has the KEY=VALUE form, `check_key(key)` may refuse a key, before its
    value is looked at (`password=` is refused as a password even when empty)."""
    config: dict[str, str] = {}
    if not text.strip():
        return config
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageProblem(f"--rdzv-conf: {item.strip()!r} is not KEY=VALUE (expected k1=v1,k2=v2,...)")
        pairs.append((key.strip(), value.strip()))
    for key, value in pairs:
        if check_key is not None:
            check_key(key)
        if not value:
            raise UsageProblem(f"--rdzv-conf: {key!r} has no value")
        if key in config:
            raise UsageProblem(f"--rdzv-conf: {key!r} is given twice")
        config[key] = value
    return config


def parse_std(text: str, option: str) -> str:
    if not _STD_RE.match(text.strip()):
        raise UsageProblem(f"{option} must be 0, 1, 2, 3 or a per-rank map like 0:1,1:2, got {text!r}")
    return text.strip()


def parse_ranks(text: str) -> set[int] | None:
    if not text.strip():
        return None
    try:
        ranks = {int(r) for r in text.split(",")}
    except ValueError:
        raise UsageProblem(f"--local-ranks-filter must be comma-separated integers like 0,1, got {text!r}") from None
    if any(r < 0 for r in ranks):
        raise UsageProblem(f"--local-ranks-filter: local ranks cannot be negative, got {text!r}")
    return ranks


def parse_filters(text: str) -> list[str]:
    """Comma-separated strings; ',,' stands for a literal comma (torchrun's convention)."""
    if not text:
        return []
    items, current, i = [], [], 0
    while i < len(text):
        if text.startswith(",,", i):
            current.append(",")
            i += 2
        elif text[i] == ",":
            items.append("".join(current))
            current, i = [], i + 1
        else:
            current.append(text[i])
            i += 1
    items.append("".join(current))
    return items


def parse_signals(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
    if unknown or not names:
        raise UsageProblem(
            f"--signals-to-handle: unknown signal name(s) {', '.join(unknown) or repr(text)} (expected e.g. SIGTERM,SIGUSR1)"
        )
    return ",".join(names)


def parse_endpoint(text: str, default_port: int | None, option: str = "--rdzv-endpoint") -> tuple[str, int | None]:
    """HOST[:PORT], [IPv6]:PORT, a bare IPv6 address or an http(s):// URL (the scheme is dropped)."""
    try:
        host, port, _ = split_endpoint(text, default_port)
    except ConfigError as exc:
        raise UsageProblem(f"{option}: {exc}") from None
    return host, port


def parse_endpoint_list(text: str, default_port: int | None, option: str = "--rdzv-endpoint") -> list[tuple[str, int | None]]:
    """A comma-separated list of endpoints (etcd); an empty item is an error."""
    try:
        return [(host, port) for host, port, _ in split_endpoint_list(text, default_port)]
    except ConfigError as exc:
        raise UsageProblem(f"{option}: {exc}") from None


def is_this_host(host: str) -> bool:
    """Whether `host` names this machine (so a c10d store there is ours to serve, not to reach)."""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        # An address this machine can bind is one of its own.
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def check_reachable(endpoints: list[tuple[str, int]], timeout: float, what: str) -> None:
    """Raise UsageProblem unless one of `endpoints` accepts a TCP connection within `timeout` s."""
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        for host, port in endpoints:
            remaining = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.05, min(remaining, 1.0))):
                    return
            except TimeoutError:
                last_error = "timed out"
            except OSError as exc:
                last_error = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        # A node that starts a moment before the host is normal; keep trying until the deadline.
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    names = ",".join(f"{h}:{p}" for h, p in endpoints)
    raise UsageProblem(
        f"cannot reach the {what} endpoint {names} ({last_error.lower()} for {timeout:g} s); "
        f"is it running? (--endpoint-check-timeout sets how long to try, 0 skips the check)"
    )


def generate_run_id() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- the script


def _module_exists(name: str) -> bool:
    """Find a module the way `python -m` in this directory would, without importing anything."""
    parts = name.split(".")
    sys.path.insert(0, os.getcwd())
    try:
        # A top-level name asks every finder (editable installs use their own) and imports nothing.
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return False
    finally:
        sys.path.remove(os.getcwd())
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return False
        # Below the top level, look in the package's directories: importing it could run user code.
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec is not None


def resolve_entrypoint(
    script: str, module: bool, no_python: bool, run_path: bool
) -> tuple[str | None, list[str], str]:
    """(program or None for --run-path, its leading args, a display name)."""
    if run_path:
        if not os.path.isfile(script):
            raise UsageProblem(f"training script {script!r} not found (--run-path needs a Python file)")
        path = os.path.abspath(script)
        return None, [path], os.path.basename(path)
    if no_python:
        if module:
            raise UsageProblem("--no-python and -m/--module cannot be used together")
        found = script if os.sep in script else shutil.which(script)
        if not found or not (os.path.isfile(found) and os.access(found, os.X_OK)):
            raise UsageProblem(
                f"--no-python runs TRAINING_SCRIPT as a program, but {script!r} is not an executable file or a command on PATH"
            )
        return script, [], os.path.basename(script)
    python = os.environ.get("PYTHON_EXEC", sys.executable)
    if module:
        # Another interpreter (PYTHON_EXEC) may see other modules than this one.
        if "PYTHON_EXEC" not in os.environ and not _module_exists(script):
            raise UsageProblem(f"module {script!r} not found (-m runs a module, as 'python -m' would)")
        return python, ["-u", "-m", script], script
    if not os.path.exists(script):
        raise UsageProblem(f"training script {script!r} not found")
    if os.path.isdir(script) and not os.path.isfile(os.path.join(script, "__main__.py")):
        # python runs a directory only through its __main__.py.
        raise UsageProblem(f"training script {script!r} is a directory (with no __main__.py)")
    return python, ["-u", script], os.path.basename(script.rstrip(os.sep))


# ---------------------------------------------------------------- rendezvous


def known_backends() -> list[str]:
    # rdzv.registry loads no torch: bad input is answered before torch prints anything.
    from rdzv.registry import backend_names

    return backend_names()


@dataclass
class _Rendezvous:
    backend: str
    endpoint: str
    run_id: str
    configs: dict[str, Any]
    embedded: bool = False


def resolve_rendezvous(
    v: Mapping[str, Any], given: set[str], min_nodes: int, max_nodes: int, notices: list[Notice]
) -> _Rendezvous:
    configs = _checked_rdzv_conf(v["rdzv_conf"])
    configs.setdefault("timeout", DEFAULT_RDZV_TIMEOUT)
    backend: str | None = v["rdzv_backend"] or None
    endpoint: str = (v["rdzv_endpoint"] or "").strip()
    run_id: str | None = (v["rdzv_id"] or "").strip() or None
    if run_id is not None:
        # Also where --standalone ignores it: a bad id is bad input either way.
        try:
            check_run_id(run_id)
        except ConfigError as exc:
            raise UsageProblem(f"--rdzv-id: {exc}") from None
    if run_id is not None and run_id.lower() == "none":
        # torchrun's default id; as a shared key it would join unrelated jobs together.
        run_id = None

    if v["standalone"]:
        if max_nodes > 1:
            raise UsageProblem(f"--standalone runs one node, but --nnodes={v['nnodes']} asks for up to {max_nodes}")
        ignored = [f"--{d.replace('_', '-')}" for d in ("rdzv_backend", "rdzv_endpoint", "rdzv_id") if d in given]
        if ignored:
            notices.append(Notice("options_ignored", f"--standalone ignores {', '.join(ignored)}", "warning"))
        return _embedded(None, configs, notices)

    if not endpoint:
        if backend in (None, "static", "c10d") and max_nodes == 1 and v["master_port"] is None:
            return _embedded(run_id, configs, notices)
        if backend not in (None, "static"):
            raise UsageProblem(f"--rdzv-backend={backend} needs --rdzv-endpoint=HOST:PORT")
        backend = "static"
    backend = backend or "etcd"

    names = known_backends()
    if backend not in names:
        raise UsageProblem(f"unknown rendezvous backend {backend!r}; choose one of {', '.join(names)}")

    for opt in ("master_addr", "master_port", "node_rank"):
        if opt in given and backend != "static":
            notices.append(
                Notice("option_ignored", f"--{opt.replace('_', '-')} is only used by the static backend; ignored", "warning")
            )

    if backend == "static":
        return _static(v, endpoint, run_id, configs, min_nodes, max_nodes, notices)

    timeout = float(v["endpoint_check_timeout"])
    if backend in ("etcd", "etcd-v2"):
        targets = parse_endpoint_list(endpoint, DEFAULT_PORTS[backend])
        check_reachable([(h, p) for h, p in targets if p is not None], timeout, backend)
    elif backend == "c10d":
        _one_endpoint(endpoint, backend)
        host, port = parse_endpoint(endpoint, DEFAULT_PORTS["c10d"])
        is_host = str(configs.get("is_host", "")).lower()
        hosting = is_host in ("1", "true", "t", "yes", "y") or (is_host == "" and (port == 0 or is_this_host(host)))
        if not hosting and port is not None:
            check_reachable([(host, port)], timeout, "c10d")
    else:
        parse_endpoint(endpoint, None)

    if run_id is None:
        if max_nodes > 1:
            raise UsageProblem(
                f"--rdzv-id is required for a multi-node {backend} run: give every node the same id "
                "(e.g. --rdzv-id=$SLURM_JOB_ID)"
            )
        run_id = generate_run_id()
        notices.append(
            Notice("run_id_generated", f"generated run id {run_id} (--rdzv-id={run_id})", fields={"run_id": run_id})
        )
    return _Rendezvous(backend, endpoint, run_id, configs)


def _checked_rdzv_conf(text: str) -> dict[str, Any]:
    """--rdzv-conf, checked as the handlers will check it (unknown keys, passwords, numbers)."""
    try:
        configs: dict[str, Any] = parse_rdzv_conf(text, check_key=check_config_key)
        check_config(configs)
    except ConfigError as exc:
        raise UsageProblem(f"--rdzv-conf: {exc}") from None
    return configs


def _one_endpoint(endpoint: str, backend: str) -> None:
    if "," in endpoint:
        raise UsageProblem(f"--rdzv-endpoint: the {backend} backend takes one HOST:PORT endpoint, got {endpoint!r}")


def _embedded(run_id: str | None, configs: dict[str, Any], notices: list[Notice]) -> _Rendezvous:
    run_id = run_id or generate_run_id()
    notices.append(
        Notice(
            "standalone",
            f"standalone run {run_id}: embedded c10d rendezvous on {EMBEDDED_ENDPOINT} (no etcd needed)",
            fields={"run_id": run_id, "backend": "c10d", "endpoint": EMBEDDED_ENDPOINT},
        )
    )
    return _Rendezvous("c10d", EMBEDDED_ENDPOINT, run_id, configs, embedded=True)


def _static(
    v: Mapping[str, Any],
    endpoint: str,
    run_id: str | None,
    configs: dict[str, Any],
    min_nodes: int,
    max_nodes: int,
    notices: list[Notice],
) -> _Rendezvous:
    if not endpoint:
        endpoint = f"{v['master_addr']}:{v['master_port'] or DEFAULT_MASTER_PORT}"
    _one_endpoint(endpoint, "static")
    _, port = parse_endpoint(endpoint, v["master_port"])
    if port is None:
        raise UsageProblem(f"static rendezvous needs a port: --rdzv-endpoint={endpoint}:PORT or --master-port")
    node_rank = int(v["node_rank"])
    if not 0 <= node_rank < max_nodes:
        raise UsageProblem(f"--node-rank={node_rank} is outside 0..{max_nodes - 1} for --nnodes={v['nnodes']}")
    if min_nodes != max_nodes:
        notices.append(Notice("static_not_elastic", f"the static backend always waits for {max_nodes} nodes", "warning"))
    configs["rank"] = node_rank
    # The static backend does not coordinate on the id, every node must simply agree: keep torchrun's.
    return _Rendezvous("static", endpoint, run_id or "none", configs)


# ---------------------------------------------------------------- everything


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

    entrypoint, lead_args, name = resolve_entrypoint(v["training_script"], v["module"], v["no_python"], v["run_path"])
    notices: list[Notice] = []
    rdzv = resolve_rendezvous(v, given, min_nodes, max_nodes, notices)
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
        virtual_local_rank=v["virtual_local_rank"],
        numa_binding=v["numa_binding"],
        quiet=v["quiet"],
        log_format=v["log_format"],
        progress_interval=v["progress_interval"],
        metrics_port=metrics_port,
        notices=notices,
    )
