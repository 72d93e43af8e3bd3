"""`python -m launcher.legacy`: torch.distributed.launch's behaviour on rdzv-launch.

Scripts written for `python -m torch.distributed.launch` read `--local-rank` (or `--local_rank`)
from their arguments. This entry point passes `--local-rank=<n>` to every worker unless
`--use-env` is given; everything else is rdzv-launch. See docs/migration.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from launcher.cli import launch_main
from launcher.problems import UsageProblem

PROG = "launcher.legacy"

USE_ENV = click.Option(
    ["--use-env", "--use_env", "use_env"],
    is_flag=True,
    default=False,
    help="Do not pass --local-rank; the script reads LOCAL_RANK from the environment (rdzv-launch's default).",
)


def _pass_local_rank(values: dict[str, Any]) -> bool:
    if values["use_env"]:
        return False
    if values["no_python"]:
        # Same rule as torch.distributed.launch.
        raise UsageProblem("when using --no-python, you must also set --use-env")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    return launch_main(sys.argv[1:] if argv is None else argv, PROG, extra=[USE_ENV], pass_local_rank=_pass_local_rank)


if __name__ == "__main__":
    raise SystemExit(main())
