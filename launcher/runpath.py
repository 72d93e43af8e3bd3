"""Worker entry point for --run-path: run a script with runpy inside the worker process.

Kept in its own tiny module: spawned workers import it by name.
"""

from __future__ import annotations

import runpy
import sys


def run_script_path(script: str, *script_args: str) -> None:
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")
