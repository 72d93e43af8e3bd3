"""The rdzv-launch option table: torchrun's options (both spellings, same defaults) plus ours.

This module must stay cheap to import (no torch): `--help` and bad input are answered from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from launcher.health.gate import WHEN as HEALTH_WHEN

# Topics in the order `--help` shows them.
TOPICS: tuple[str, ...] = (
    "Nodes and workers",
    "Rendezvous",
    "What to run",
    "Fault tolerance",
    "Logs and output",
    "Devices",
)


@dataclass(frozen=True)
class Opt:
    """One option: its spellings, default and help, and the help topic it is listed under."""

    names: tuple[str, ...]
    dest: str
    topic: str
    help: str
    default: Any = None
    type: Any = str
    flag: bool = False
    metavar: str | None = None
    # Default as shown in --help, where the raw default says nothing (None, "").
    shown_default: str | None = None
    torchrun: bool = True


NPROC_VALUES = "N|auto|cpu|gpu|xpu"
START_METHODS = ("spawn", "fork", "forkserver")
# torch.numa.binding.AffinityMode values (a test keeps this list in step with torch).
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
LOG_FORMATS = ("text", "json")
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"

OPTIONS: tuple[Opt, ...] = (
    # Nodes and workers
    Opt(("--nnodes",), "nnodes", "Nodes and workers",
        "Number of nodes, or a range MIN:MAX for an elastic job.", default="1:1", metavar="N|MIN:MAX"),
    Opt(("--nproc-per-node", "--nproc_per_node"), "nproc_per_node", "Nodes and workers",
        "Workers per node: a number, 'gpu' (visible GPUs), 'cpu' (CPU cores) or 'auto' "
        "(visible GPUs, else CPU cores).", default="1", metavar=NPROC_VALUES),
    Opt(("--allow-oversubscribe",), "allow_oversubscribe", "Nodes and workers",
        "Allow a --nproc-per-node above 4x this machine's CPUs and above its accelerators "
        "(refused without it).", default=False, flag=True, torchrun=False),
    Opt(("--node-rank", "--node_rank"), "node_rank", "Nodes and workers",
        "Rank of this node; only used by the static backend.", default=0, type=int, metavar="N"),
    Opt(("--role",), "role", "Nodes and workers", "User-defined role of the workers.",
        default="default", metavar="NAME"),
    Opt(("--local-addr", "--local_addr"), "local_addr", "Nodes and workers",
        "Address other nodes use to reach this one.", metavar="ADDR",
        shown_default="this machine's FQDN"),
    # Rendezvous
    Opt(("--rdzv-backend", "--rdzv_backend"), "rdzv_backend", "Rendezvous",
        "Rendezvous backend: etcd, etcd-v2, c10d or static.", metavar="NAME",
        shown_default="etcd with --rdzv-endpoint, else static (one node: embedded c10d)"),
    Opt(("--rdzv-endpoint", "--rdzv_endpoint"), "rdzv_endpoint", "Rendezvous",
        "Rendezvous endpoint HOST[:PORT] (etcd: a comma-separated list is accepted).", default="",
        metavar="HOST[:PORT]", shown_default="none"),
    Opt(("--rdzv-id", "--rdzv_id"), "rdzv_id", "Rendezvous",
        "Job id shared by all nodes of one run.", metavar="ID",
        shown_default="generated for one node; required for several"),
    Opt(("--rdzv-conf", "--rdzv_conf"), "rdzv_conf", "Rendezvous",
        "Backend settings, e.g. join_timeout=600,last_call_timeout=30.", default="",
        metavar="K=V,...", shown_default="none"),
    Opt(("--standalone",), "standalone", "Rendezvous",
        "One-node run on an embedded c10d store on a free port; --rdzv-backend, --rdzv-endpoint "
        "and --rdzv-id are generated.", default=False, flag=True),
    Opt(("--master-addr", "--master_addr"), "master_addr", "Rendezvous",
        "Address of node rank 0; static backend only.", default="127.0.0.1", metavar="ADDR"),
    Opt(("--master-port", "--master_port"), "master_port", "Rendezvous",
        "Port on node rank 0; static backend only.", type=int, metavar="PORT", shown_default="29500"),
    Opt(("--node-segment",), "node_segment", "Rendezvous",
        "This node's segment (NVLink domain) label; with --rdzv-conf segment_size=S rounds are "
        "whole segments of S nodes with contiguous ranks.", metavar="LABEL",
        shown_default="the GPUs' NVLink cluster UUID where NVML reports one, else none", torchrun=False),
    Opt(("--endpoint-check-timeout",), "endpoint_check_timeout", "Rendezvous",
        "Seconds to keep trying to reach a remote rendezvous endpoint before giving up (0: no check).",
        default=2.0, type=float, metavar="SECONDS", torchrun=False),
    # What to run
    Opt(("-m", "--module"), "module", "What to run",
        "Run TRAINING_SCRIPT as a module, like 'python -m'.", default=False, flag=True),
    Opt(("--no-python", "--no_python"), "no_python", "What to run",
        "Run TRAINING_SCRIPT as a program, without 'python'.", default=False, flag=True),
    Opt(("--run-path", "--run_path"), "run_path", "What to run",
        "Run the script with runpy.run_path in a Python worker process (takes precedence over "
        "--no-python).", default=False, flag=True),
    Opt(("--legacy-local-rank",), "legacy_local_rank", "What to run",
        "Append --local-rank=<n> to the script's arguments, as torch.distributed.launch did.",
        default=False, flag=True, torchrun=False),
    # Fault tolerance
    Opt(("--max-restarts", "--max_restarts"), "max_restarts", "Fault tolerance",
        "Worker group restarts before the job fails.", default=0, type=int, metavar="N"),
    Opt(("--monitor-interval", "--monitor_interval"), "monitor_interval", "Fault tolerance",
        "Seconds between checks of the workers.", default=0.1, type=float, metavar="SECONDS"),
    Opt(("--start-method", "--start_method"), "start_method", "Fault tolerance",
        "How worker processes are created.", default="spawn", type=click.Choice(START_METHODS),
        metavar="|".join(START_METHODS)),
    Opt(("--signals-to-handle", "--signals_to_handle"), "signals_to_handle", "Fault tolerance",
        "Signals forwarded to the workers before the launcher stops.", default=DEFAULT_SIGNALS,
        metavar="SIG,..."),
    Opt(("--shutdown-timeout", "--shutdown_timeout"), "shutdown_timeout", "Fault tolerance",
        "Seconds between SIGTERM and SIGKILL when stopping workers.", type=int, metavar="SECONDS",
        shown_default="$TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 30"),
    Opt(("--exit-barrier-timeout", "--exit_barrier_timeout"), "exit_barrier_timeout", "Fault tolerance",
        "Seconds a node whose workers succeeded waits for the other nodes to finish before it "
        "leaves anyway (0: do not wait).", default=300.0, type=float, metavar="SECONDS", torchrun=False),
    Opt(("--health-check",), "health_check", "Fault tolerance",
        "Run CMD before this node joins (see --health-check-when); while it fails or hangs, this "
        "node stays out of the round and retries with backoff. builtin:gpu checks every visible "
        "accelerator.", metavar="CMD|builtin:gpu", shown_default="none", torchrun=False),
    Opt(("--health-check-timeout",), "health_check_timeout", "Fault tolerance",
        "Seconds a --health-check may take before it is killed and counts as failed.", default=120.0,
        type=float, metavar="SECONDS", torchrun=False),
    Opt(("--health-check-when",), "health_check_when", "Fault tolerance",
        "Which joins run --health-check: first-and-failure (the first, and the next after this "
        "node's own workers failed; not a re-formation another node caused) or every-join.",
        default=HEALTH_WHEN[0], type=click.Choice(HEALTH_WHEN),
        metavar="|".join(HEALTH_WHEN), torchrun=False),
    # Logs and output
    Opt(("--log-dir", "--log_dir"), "log_dir", "Logs and output",
        "Base directory for worker logs and error files.", metavar="DIR",
        shown_default="a new temporary directory"),
    Opt(("-r", "--redirects"), "redirects", "Logs and output",
        "Redirect worker streams to files: 0 none, 1 stdout, 2 stderr, 3 both, or per local rank "
        "like 0:1,1:2.", default="0", metavar="STD"),
    Opt(("-t", "--tee"), "tee", "Logs and output",
        "Like --redirects, but also print to the console.", default="0", metavar="STD"),
    Opt(("--local-ranks-filter", "--local_ranks_filter"), "local_ranks_filter", "Logs and output",
        "Only show these local ranks' output on the console, e.g. 0,1.", default="",
        metavar="N,...", shown_default="all"),
    Opt(("--logs-specs", "--logs_specs"), "logs_specs", "Logs and output",
        "Name of a 'torchrun.logs_specs' entry point that lays out the log files.", metavar="NAME",
        shown_default="torch's DefaultLogsSpecs"),
    Opt(("--duplicate-stdout-filters", "--duplicate_stdout_filters"), "duplicate_stdout_filters",
        "Logs and output",
        "Also copy stdout lines containing any of these strings to a file (',,' escapes a comma).",
        default="", metavar="S,...", shown_default="none"),
    Opt(("--duplicate-stderr-filters", "--duplicate_stderr_filters"), "duplicate_stderr_filters",
        "Logs and output", "Same for stderr.", default="", metavar="S,...", shown_default="none"),
    Opt(("--event-log-handler", "--event_log_handler"), "event_log_handler", "Logs and output",
        "torch elastic event handler: null, console or dynamic_rendezvous.", default="null",
        metavar="NAME"),
    Opt(("--log-line-prefix-template", "--log_line_prefix_template"), "log_line_prefix_template",
        "Logs and output",
        "Prefix of each console line of a tee'd stream; macros ${role_name}, ${local_rank}, "
        "${rank}, ${hostname}.", default="", metavar="TEMPLATE",
        shown_default="$TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE or [${role_name}${local_rank}]:"),
    Opt(("-q", "--quiet"), "quiet", "Logs and output",
        "Print no progress or notices, only errors.", default=False, flag=True, torchrun=False),
    Opt(("--log-format",), "log_format", "Logs and output",
        "Format of the launcher's own messages on stderr.", default="text",
        type=click.Choice(LOG_FORMATS), metavar="|".join(LOG_FORMATS), torchrun=False),
    Opt(("--progress-interval",), "progress_interval", "Logs and output",
        "At most one rendezvous progress line per this many seconds.", default=5.0, type=float,
        metavar="SECONDS", torchrun=False),
    Opt(("--metrics-port",), "metrics_port", "Logs and output",
        "Serve Prometheus metrics on /metrics and a /healthz on this port (0: any free port, "
        "printed).", type=int, metavar="PORT", shown_default="off", torchrun=False),
    # Devices
    Opt(("--virtual-local-rank", "--virtual_local_rank"), "virtual_local_rank", "Devices",
        "Give every worker LOCAL_RANK=0 and only its own GPU in CUDA_VISIBLE_DEVICES.",
        default=False, flag=True),
    Opt(("--numa-binding", "--numa_binding"), "numa_binding", "Devices",
        "Bind workers to the CPUs near their GPU.", type=click.Choice(NUMA_MODES),
        metavar="|".join(NUMA_MODES), shown_default="off"),
)

OPTIONS_BY_DEST: dict[str, Opt] = {o.dest: o for o in OPTIONS}


def env_name(dest: str) -> str:
    """torchrun's environment fallback for an option: PET_<DEST>."""
    return f"PET_{dest.upper()}"


def parse_env_flag(name: str, raw: str) -> bool:
    """torchrun switches flags on with a non-zero integer; true/false words are accepted too."""
    text = raw.strip().lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    try:
        return bool(int(text))
    except ValueError:
        raise click.BadParameter(f"{name}={raw!r} must be 0 or 1") from None


class PetOption(click.Option):
    """A click option whose environment fallback follows torchrun's PET_ rules."""

    def __init__(self, spec: Opt, **kwargs: Any) -> None:
        self.spec = spec
        super().__init__([*spec.names, spec.dest], envvar=env_name(spec.dest), **kwargs)

    def value_from_envvar(self, ctx: click.Context) -> Any:
        raw = self.resolve_envvar_value(ctx)
        if raw is None:
            return None
        if self.is_flag:
            # click's bool parsing rejects "2"; torchrun's bool(int(value)) accepts it.
            return parse_env_flag(str(self.envvar), raw)
        return raw

    def help_row(self) -> tuple[str, str]:
        spec = self.spec
        short = [n for n in spec.names if not n.startswith("--")]
        dashed = [n for n in spec.names if n.startswith("--") and "_" not in n]
        left = ", ".join(short + dashed)
        if not spec.flag:
            left += f" {spec.metavar or 'TEXT'}"
        notes = []
        if not spec.flag:
            shown = spec.shown_default if spec.shown_default is not None else spec.default
            notes.append(f"default: {shown}")
        aliases = [n for n in spec.names if "_" in n]
        if aliases:
            notes.append("also " + ", ".join(aliases))
        notes.append(f"env: {env_name(spec.dest)}")
        return left, f"{spec.help} [{'; '.join(notes)}]"


def make_option(spec: Opt) -> PetOption:
    kwargs: dict[str, Any] = {"default": spec.default, "show_default": False}
    if spec.flag:
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = spec.type
        if spec.metavar:
            kwargs["metavar"] = spec.metavar
    return PetOption(spec, **kwargs)


ARGUMENT_HELP: tuple[tuple[str, str], ...] = (
    ("TRAINING_SCRIPT", "Python script (a module with -m, a program with --no-python)."),
    ("SCRIPT_ARGS", "Passed to every worker untouched, including ones that look like options."),
)


class TopicCommand(click.Command):
    """A click command whose --help lists options by topic, each with its default and PET_ variable."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Arguments"):
            formatter.write_dl(list(ARGUMENT_HELP))
        grouped: dict[str, list[tuple[str, str]]] = {}
        others: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            if isinstance(param, PetOption):
                grouped.setdefault(param.spec.topic, []).append(param.help_row())
            elif isinstance(param, click.Option):
                record = param.get_help_record(ctx)
                if record:
                    others.append(record)
        for topic in (*TOPICS, *sorted(set(grouped) - set(TOPICS))):
            if grouped.get(topic):
                with formatter.section(topic):
                    formatter.write_dl(grouped[topic])
        if others:
            with formatter.section("Other"):
                formatter.write_dl(others)


def expand_abbreviations(argv: Sequence[str], command: click.Command) -> list[str]:
    """argparse's rule, which torchrun users rely on: a unique prefix names a long option
    (`--nproc 2`). Both spellings of one option count as one; an ambiguous prefix is a usage
    error listing the candidates. Only the launcher's own options, before the script, are read."""
    options: dict[str, click.Option] = {
        name: param
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    }
    expanded = list(argv)
    i = 0
    while i < len(expanded) and expanded[i].startswith("-") and expanded[i] not in ("-", "--"):
        token = expanded[i]
        name, eq, value = token.partition("=")
        param = options.get(name) if name.startswith("--") else None
        if name.startswith("--") and param is None:
            matches = {id(p): (n, p) for n, p in options.items() if n.startswith(name)}
            if len(matches) > 1:
                shown = sorted(_dashed(p) for _, p in matches.values())
                raise click.UsageError(f"ambiguous option: {name} could match {', '.join(shown)}")
            if matches:
                (full, param), = matches.values()
                expanded[i] = full + eq + value
        if param is None and not name.startswith("--"):
            # A short option (-r 3, -m); -r3 carries its value.
            param = next((p for p in command.params if isinstance(p, click.Option) and name in p.opts), None)
            eq = "=" if len(name) > 2 else eq
        takes_value = param is not None and not param.is_flag and not param.count
        i += 2 if takes_value and not eq else 1
    return expanded


def _dashed(param: click.Option) -> str:
    return next((n for n in param.opts if n.startswith("--") and "_" not in n), param.opts[0])


def build_command(
    name: str,
    callback: Callable[..., Any],
    extra: Sequence[click.Option] = (),
    help_text: str = "",
    epilog: str = "",
) -> TopicCommand:
    """The launcher command: every option in OPTIONS plus `extra`, then the script and its args."""
    params: list[click.Parameter] = [make_option(spec) for spec in OPTIONS]
    params.extend(extra)
    params.append(click.Argument(["training_script"], metavar="TRAINING_SCRIPT"))
    params.append(
        click.Argument(["training_script_args"], nargs=-1, type=click.UNPROCESSED, metavar="[SCRIPT_ARGS]...")
    )
    return TopicCommand(
        name=name,
        callback=callback,
        params=params,
        help=help_text,
        epilog=epilog,
        context_settings={
            # Everything after the script belongs to the script.
            "allow_interspersed_args": False,
            "help_option_names": ["-h", "--help"],
            "max_content_width": 110,
            "terminal_width": int(os.environ.get("COLUMNS", "100")),
        },
    )
