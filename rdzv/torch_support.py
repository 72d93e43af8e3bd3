"""Which torch releases rdzv supports, checked without importing torch.

The range is the one CI tests (scripts/test: the oldest, the pinned set-up and the newest
release) and the one `pyproject.toml` declares. A release is `major.minor`: pre-releases and
local builds of a supported release (`2.9.0a0+git...`, `2.11.0+cu130`, the `nv` builds of
NVIDIA's images) are that release.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from importlib import metadata

OLDEST = (2, 9)
NEWEST = (2, 15)
RANGE = f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"

_RELEASE_RE = re.compile(r"^(\d+)\.(\d+)")


class UnsupportedTorchError(RuntimeError):
    """The installed torch is outside the supported range (or missing)."""


def release_of(version: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string, None if it does not start like one."""
    match = _RELEASE_RE.match(version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def installed_version() -> str | None:
    """The installed torch's version from its package metadata (no import), else None.

    A torch without metadata (a source tree on PYTHONPATH) is imported to ask it."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return str(torch.__version__)


def problem_with(version: str | None) -> str | None:
    """What is wrong with this torch version for rdzv, in one line; None when it is supported."""
    if version is None:
        return f"torch is not installed; rdzv needs torch {RANGE}"
    release = release_of(version)
    if release is None or not OLDEST <= release <= NEWEST:
        return f"torch {version} is installed; rdzv supports torch {RANGE}"
    return None


@lru_cache(maxsize=1)
def installed_problem() -> str | None:
    """`problem_with` the installed torch (looked up once per process)."""
    return problem_with(installed_version())


def check_torch() -> None:
    """Raise UnsupportedTorchError naming the installed version and the range, if it is outside."""
    problem = installed_problem()
    if problem is not None:
        raise UnsupportedTorchError(problem)
