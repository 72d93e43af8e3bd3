"""`rdzv`: look at and clean up rendezvous runs in etcd.

The etcd key layout belongs to `rdzv.inspect`; this module only calls it and formats the answer
(the watch-driven commands live in their own modules: `rdzv status --watch` in
`launcher.ops.live_status`, `rdzv events` in `launcher.ops.events`, `rdzv exporter` in
`launcher.ops.exporter`):

    list_runs(endpoint, prefix=..., **conn) -> list[dict]             # one dict per run
    describe_run(endpoint, run_id, prefix=..., **conn) -> dict        # one run in detail
    clean_run(endpoint, run_id, prefix=..., force=..., **conn) -> int # keys removed

`prefix` is only passed when --prefix is given (rdzv.inspect owns the default); `conn` carries
the --rdzv-conf settings (cacert, cert, key, user, password, timeout) as the handler reads them.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import click

from launcher.parsers import parse_rdzv_conf
from launcher.problems import UsageProblem

PROG = "rdzv"
# Columns first in `rdzv status`, when present; any other keys follow in their own order.
PREFERRED_COLUMNS = (
    "run_id", "round", "world_size", "min_nodes", "max_nodes", "closed", "corrupt", "members", "waiting",
    "spares", "lost_members", "master",
)


class NotAvailable(click.ClickException):
    exit_code = 1


def _inspect() -> ModuleType:
    try:
        # import_module reads sys.modules, so a stand-in installed there is honoured even
        # after the real module was imported once (which sets the package attribute).
        inspect_module = importlib.import_module("rdzv.inspect")
    except ModuleNotFoundError as exc:
        if exc.name in ("rdzv.inspect", "rdzv"):
            raise NotAvailable(
                "run inspection is not available in this installation (rdzv.inspect is missing)"
            ) from None
        raise NotAvailable(f"rdzv.inspect could not be imported: {exc}") from None
    except ImportError as exc:
        raise NotAvailable(f"rdzv.inspect could not be imported: {exc}") from None
    return inspect_module


def _call(name: str, *args: Any, prefix: str | None, **kwargs: Any) -> Any:
    fn: Callable[..., Any] | None = getattr(_inspect(), name, None)
    if fn is None:
        raise NotAvailable(f"rdzv.inspect has no {name}(); this command is not available yet")
    if prefix is not None:
        kwargs["prefix"] = prefix
    return fn(*args, **kwargs)


def _cell(value: Any, in_table: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set, Mapping)):
        # A table cell shows how many; a detail line shows the items.
        if in_table or any(isinstance(v, Mapping) for v in value):
            return str(len(value))
        if isinstance(value, Mapping):
            return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        return ", ".join(map(str, value)) or "-"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain text table over the union of the rows' keys (preferred columns first)."""
    if not rows:
        return "no runs"
    keys: list[str] = [k for k in PREFERRED_COLUMNS if any(k in r for r in rows)]
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    cells = [[k.upper() for k in keys]] + [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def format_run(run: Mapping[str, Any]) -> str:
    """`key: value` lines; a list of dicts (e.g. members) becomes an indented table."""
    lines: list[str] = []
    width = max((len(k) for k in run), default=0)
    for key, value in run.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{key}:")
            lines.extend("  " + line for line in format_table(value).splitlines())
        else:
            lines.append(f"{key.ljust(width)}  {_cell(value, in_table=False)}")
    return "\n".join(lines)


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _conn(conf: str) -> dict[str, Any]:
    try:
        return dict(parse_rdzv_conf(conf))
    except UsageProblem as exc:
        raise click.BadParameter(str(exc)) from None


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    options: Iterable[Callable[[Callable[..., Any]], Callable[..., Any]]] = (
        click.option("--rdzv-endpoint", "--rdzv_endpoint", "endpoint", envvar="PET_RDZV_ENDPOINT", required=True,
                     metavar="HOST:PORT[,...]", help="etcd endpoint(s). [env: PET_RDZV_ENDPOINT]"),
        click.option("--prefix", default=None, metavar="PATH", help="Key prefix of the runs (default: the handler's)."),
        click.option("--rdzv-conf", "--rdzv_conf", "conf", envvar="PET_RDZV_CONF", default="", metavar="K=V,...",
                     help="Connection settings as for rdzv-launch (TLS files, user; the password from $RDZV_ETCD_PASSWORD or password_file=PATH). [env: PET_RDZV_CONF]"),
    )
    for option in reversed(list(options)):
        fn = option(fn)
    return fn


def _valid_run_id(_ctx: click.Context, _param: click.Parameter, run_id: str | None) -> str | None:
    """The run-id rule of the handlers and rdzv-launch: a bad id is a usage error (exit 2)."""
    if run_id is None:
        return None
    from rdzv.rendezvous.settings import ConfigError, check_run_id

    try:
        return check_run_id(run_id)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(name=PROG, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Inspect, follow, export and clean up rendezvous runs stored in etcd."""


@cli.command()
@_common
@click.option("--rdzv-id", "--rdzv_id", "run_id", envvar="PET_RDZV_ID", default=None, metavar="ID",
              callback=_valid_run_id, help="Describe this run instead of listing all.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", is_flag=True,
              help="With --rdzv-id: keep the run's state on screen, updated as it changes (Ctrl-C ends).")
def status(endpoint: str, prefix: str | None, conf: str, run_id: str | None, as_json: bool, watch: bool) -> int:
    """List the runs under the prefix, or describe one run."""
    conn = _conn(conf)
    if watch:
        if run_id is None or as_json:
            raise click.UsageError("--watch needs --rdzv-id and does not go with --json")
        from launcher.ops.live_status import watch_status

        return _interruptible(watch_status, endpoint, run_id, _prefix(prefix), conn)
    if run_id is None:
        runs = _call("list_runs", endpoint, prefix=prefix, **conn)
        _dump(runs) if as_json else click.echo(format_table(runs))
    else:
        run = _call("describe_run", endpoint, run_id, prefix=prefix, **conn)
        _dump(run) if as_json else click.echo(format_run(run))
    return 0


def _prefix(prefix: str | None) -> str:
    return prefix if prefix is not None else _inspect().DEFAULT_PREFIX


def _interruptible(fn: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """Run a command that goes on until stopped: Ctrl-C ends it with exit code 130."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130


@cli.command()
@_common
@click.option("--rdzv-id", "--rdzv_id", "run_id", envvar="PET_RDZV_ID", required=True, metavar="ID",
              callback=_valid_run_id, help="The run whose events to show.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep watching until the run is closed and its keys are gone (Ctrl-C ends).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line (torch's RdzvEvent fields and more).")
def events(endpoint: str, prefix: str | None, conf: str, run_id: str, follow: bool, as_json: bool) -> int:
    """A run's rendezvous events: nodes joined, lost and left, last calls, rounds sealed, close."""
    from launcher.ops.events import run_events

    return _interruptible(run_events, endpoint, run_id, _prefix(prefix), follow=follow, as_json=as_json,
                          conn=_conn(conf))


@cli.command()
@_common
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to serve /metrics and /healthz on (0: any free one).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
def exporter(endpoint: str, prefix: str | None, conf: str, port: int, host: str) -> int:
    """Serve Prometheus metrics of every run under the prefix, from one watch of it."""
    try:
        from launcher.ops.exporter import serve
    except ModuleNotFoundError as exc:
        raise NotAvailable(f"rdzv exporter needs {exc.name} (pip install prometheus_client)") from None
    return _interruptible(serve, endpoint, _prefix(prefix), host, port, _conn(conf))


@cli.command()
@_common
@click.option("--rdzv-id", "--rdzv_id", "run_id", envvar="PET_RDZV_ID", required=True, metavar="ID",
              callback=_valid_run_id, help="The run to remove.")
@click.option("--force", is_flag=True, help="Remove the run even while nodes still hold it.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def clean(endpoint: str, prefix: str | None, conf: str, run_id: str, force: bool, yes: bool, as_json: bool) -> int:
    """Remove every key of one run (for a run that will not come back)."""
    conn = _conn(conf)
    if not yes:
        click.confirm(f"remove every key of run {run_id!r} at {endpoint}?", abort=True)
    if force:
        conn["force"] = True
    removed = _call("clean_run", endpoint, run_id, prefix=prefix, **conn)
    if as_json:
        _dump({"run_id": run_id, "removed": removed})
    else:
        click.echo(f"cleaned run {run_id}: {removed} key(s) removed")
    return 0


@cli.group()
def quarantine() -> None:
    """List or release a run's quarantined nodes (set aside after failing the group K times)."""


@quarantine.command("list")
@_common
@click.argument("run_id", metavar="RUN", callback=_valid_run_id)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def quarantine_list(endpoint: str, prefix: str | None, conf: str, run_id: str, as_json: bool) -> int:
    """The quarantined hosts of RUN: why, until when."""
    rows = _call("list_quarantined", endpoint, run_id, prefix=prefix, **_conn(conf))
    if as_json:
        _dump(rows)
    else:
        click.echo(format_table(rows) if rows else f"no node of run {run_id} is quarantined")
    return 0


@quarantine.command("release")
@_common
@click.argument("run_id", metavar="RUN", callback=_valid_run_id)
@click.argument("host", required=False, metavar="[HOST]")
def quarantine_release(endpoint: str, prefix: str | None, conf: str, run_id: str, host: str | None) -> int:
    """End the quarantine of HOST (every host without one): its node joins a later round."""
    released = _call("release_quarantined", endpoint, run_id, host, prefix=prefix, **_conn(conf))
    if not released:
        what = f"host {host} is" if host else "no host is"
        raise NotAvailable(f"{what} quarantined in run {run_id}")
    click.echo(f"released from quarantine in run {run_id}: {', '.join(released)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG, standalone_mode=False)
    except click.ClickException as exc:
        sys.stderr.write(f"{PROG}: error: {exc.format_message()}\n")
        return exc.exit_code
    except click.Abort:
        sys.stderr.write(f"{PROG}: aborted\n")
        return 1
    except Exception as exc:
        # Connection and etcd errors from rdzv.inspect: one line, not a traceback. Its "no such
        # run" (a LookupError that is not a KeyError) says it all without a type name.
        plain = isinstance(exc, LookupError) and not isinstance(exc, KeyError)
        sys.stderr.write(f"{PROG}: error: {exc if plain else f'{type(exc).__name__}: {exc}'}\n")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
