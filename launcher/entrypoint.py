"""What a worker runs: the program and leading arguments for TRAINING_SCRIPT (-m, --no-python,
--run-path), checked before anything is spawned."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from importlib.machinery import PathFinder

from launcher.problems import UsageProblem


def module_exists(name: str) -> bool:
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
        if "PYTHON_EXEC" not in os.environ and not module_exists(script):
            raise UsageProblem(f"module {script!r} not found (-m runs a module, as 'python -m' would)")
        return python, ["-u", "-m", script], script
    if not os.path.exists(script):
        raise UsageProblem(f"training script {script!r} not found")
    if os.path.isdir(script) and not os.path.isfile(os.path.join(script, "__main__.py")):
        # python runs a directory only through its __main__.py.
        raise UsageProblem(f"training script {script!r} is a directory (with no __main__.py)")
    return python, ["-u", script], os.path.basename(script.rstrip(os.sep))
