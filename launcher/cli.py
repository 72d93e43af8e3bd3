"""rdzv-launch: torchrun's command line on torch's elastic agent, with our rendezvous handlers.

Imports stay lean until the options are checked: torch is only loaded to run the job (or to
check a backend name), so `--help` and bad input answer quickly.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import click

from launcher.completion import PRINT_COMPLETION
from launcher.config import build_settings
from launcher.options import build_command, expand_abbreviations
from launcher.problems import LaunchFailed, UsageProblem
from launcher.report import Reporter
from launcher.settings import LaunchSettings

PROG = "rdzv-launch"

HELP = """Launch TRAINING_SCRIPT on this node as part of a distributed PyTorch job.

Accepts torchrun's options (both spellings, same defaults). With --standalone, or one node and no
--rdzv-endpoint, the job runs on an embedded c10d store; with --rdzv-endpoint it meets the other
nodes through etcd unless --rdzv-backend says otherwise.
"""

EPILOG = """Examples:

\b
  rdzv-launch --standalone --nproc-per-node=2 examples/train_ddp.py
  rdzv-launch --nnodes=2:4 --nproc-per-node=gpu --rdzv-endpoint=etcd:2379 --rdzv-id=job42 train.py
  rdzv-launch --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node0:29400 --rdzv-id=job42 train.py
"""

USAGE_EXIT = 2
SIGNAL_EXIT = 1


def _collect(**values: Any) -> tuple[dict[str, Any], set[str]]:
    ctx = click.get_current_context()
    given = {
        name
        for name in values
        if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    }
    return values, given


def parse(
    argv: Sequence[str], prog: str, extra: Sequence[click.Option] = ()
) -> tuple[dict[str, Any], set[str]] | int:
    """Option values and the names given explicitly, or an exit code (after --help)."""
    command = build_command(prog, _collect, extra=[*extra, PRINT_COMPLETION], help_text=HELP, epilog=EPILOG)
    args = expand_abbreviations(argv, command)
    result = command.main(args=args, prog_name=prog, standalone_mode=False)
    if isinstance(result, tuple):
        return result
    return int(result or 0)


def usage_error(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: error: {message}\n")
    return USAGE_EXIT


def run(settings: LaunchSettings, reporter: Reporter, prog: str) -> int:
    """Run the job; every outcome becomes an exit code and (at most) a short report."""
    from launcher import agent

    settings.notices.extend(agent.import_torch())
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.elastic.rendezvous import RendezvousError

    try:
        # record: the first failed worker's error file becomes the launcher's (TORCHELASTIC_ERROR_FILE).
        record(agent.launch)(settings, reporter)
        return 0
    except UsageProblem as exc:
        return usage_error(prog, str(exc))
    except LaunchFailed as exc:
        reporter.error("launch_failed", str(exc))
        return 1
    except ChildFailedError as exc:
        failures = {
            rank: {"exitcode": f.exitcode, "pid": f.pid, "error_file": f.error_file, "message": f.message}
            for rank, f in exc.failures.items()
        }
        if reporter.json:
            reporter.error("workers_failed", exc.format_msg(), failures=failures)
        else:
            sys.stderr.write(exc.format_msg() + "\n")
        return 1
    except SignalException as exc:
        reporter.error("signal", f"stopped by {signal.Signals(exc.sigval).name}; workers were stopped", signal=int(exc.sigval))
        # torchrun's exit code for a handled signal (2.9-2.15): its SignalException ends
        # the program like any uncaught exception, with 1.
        return SIGNAL_EXIT
    except RendezvousError as exc:
        reporter.error("rendezvous_failed", f"rendezvous {settings.run_id} failed: {type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        reporter.error("interrupted", "interrupted")
        return 128 + signal.SIGINT
    except Exception as exc:
        traceback.print_exc()
        reporter.error("launcher_failed", f"{type(exc).__name__}: {exc}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return launch_main(sys.argv[1:] if argv is None else argv, PROG)


def launch_main(
    argv: Sequence[str],
    prog: str,
    extra: Sequence[click.Option] = (),
    pass_local_rank: Callable[[dict[str, Any]], bool] | None = None,
) -> int:
    """Shared by rdzv-launch and launcher.legacy; `pass_local_rank(values)` decides --local-rank."""
    try:
        parsed = parse(argv, prog, extra)
    except click.UsageError as exc:
        return usage_error(prog, exc.format_message())
    except click.ClickException as exc:
        sys.stderr.write(f"{prog}: error: {exc.format_message()}\n")
        return exc.exit_code
    except click.Abort:
        return 128 + signal.SIGINT
    if isinstance(parsed, int):
        return parsed
    values, given = parsed
    # From the package metadata, before anything imports torch: an unsupported torch is one
    # line, not the traceback of whatever it lacks.
    from rdzv.torch_support import installed_problem

    problem = installed_problem()
    if problem is not None:
        return usage_error(prog, problem)
    reporter = Reporter(prog, values["log_format"], values["quiet"])
    # Before anything imports torch.distributed.elastic (the backend-name check does).
    from launcher.agent import prepare_logging

    prepare_logging(reporter)
    try:
        local_rank = pass_local_rank(values) if pass_local_rank else values["legacy_local_rank"]
        settings = build_settings(values, given, local_rank)
    except UsageProblem as exc:
        return usage_error(prog, str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return run(settings, reporter, prog)


if __name__ == "__main__":
    raise SystemExit(main())
