"""`--print-completion SHELL`: a shell completion script for rdzv-launch, as torchrun 2.14+ prints.

bash and zsh get click's own completion (the script asks rdzv-launch for candidates, so it
follows the option table); tcsh, which click does not support, gets a static list of options.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "tcsh")


def complete_var(prog: str) -> str:
    """The environment variable click's completion scripts call the program with."""
    return "_{}_COMPLETE".format(prog.replace("-", "_").replace(".", "_").upper())


def completion_script(command: click.Command, prog: str, shell: str) -> str:
    if shell == "tcsh":
        names = sorted(
            name[2:]
            for param in command.params
            if isinstance(param, click.Option)
            for name in param.opts
            if name.startswith("--")
        )
        # Options after `--`, files for everything else.
        return f"complete {prog} 'c/--/({' '.join(names)})/' 'p/*/f/'"
    completion = get_completion_class(shell)
    assert completion is not None, shell
    return completion(command, {}, prog, complete_var(prog)).source()


def print_completion(ctx: click.Context, _param: click.Parameter, shell: str | None) -> None:
    """Eager option callback: print the script and stop, before the script argument is needed."""
    if shell is None or ctx.resilient_parsing:
        return
    click.echo(completion_script(ctx.command, ctx.info_name or "rdzv-launch", shell))
    ctx.exit(0)


PRINT_COMPLETION = click.Option(
    ["--print-completion", "--print_completion", "print_completion"],
    type=click.Choice(SHELLS),
    callback=print_completion,
    expose_value=False,
    is_eager=True,
    metavar="|".join(SHELLS),
    help="Print a shell completion script for rdzv-launch to stdout and exit "
    "(e.g. --print-completion zsh > ~/.zsh/completions/_rdzv-launch).",
)
