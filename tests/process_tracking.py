"""What the test etcd servers leave behind, cleaned up even when a test or teardown blew up.

Every started process and data dir is tracked; an atexit hook kills and removes leftovers, a
child dies with the thread that forked it, and data dirs of a SIGKILLed run are swept.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

_live: dict[int, subprocess.Popen[bytes]] = {}
_live_dirs: set[str] = set()
_live_lock = threading.Lock()
_swept: set[str] = set()  # prefixes whose stale dirs were swept


def free_port() -> int:
    # Racy by nature (the port is released before etcd binds it); start() retries on EADDRINUSE.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tmp_root() -> str | None:
    # tmpfs makes etcd's WAL writes cheap; fall back to the default temp dir.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def track(proc: subprocess.Popen[bytes]) -> None:
    """Kill `proc` at exit unless `untrack`ed first."""
    with _live_lock:
        _live[proc.pid] = proc


def untrack(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.pop(proc.pid, None)


def new_data_dir(prefix: str) -> Path:
    """A fresh directory (tmpfs where there is one), removed at exit unless `drop_data_dir`."""
    if prefix not in _swept:
        _swept.add(prefix)
        _sweep_stale_dirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_tmp_root()))
    (path / "owner.pid").write_text(str(os.getpid()))
    with _live_lock:
        _live_dirs.add(str(path))
    return path


def drop_data_dir(path: Path) -> None:
    with _live_lock:
        _live_dirs.discard(str(path))
    shutil.rmtree(path, ignore_errors=True)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the thread that forked it dies, so a SIGKILLed pytest
    leaves nothing behind. Main thread only: PDEATHSIG fires on the death of the forking
    *thread*."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live.values())
        dirs = list(_live_dirs)
        _live.clear()
        _live_dirs.clear()
    for p in procs:
        with contextlib.suppress(OSError):
            p.kill()
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_kill_leftovers)


def _sweep_stale_dirs(prefix: str) -> None:
    # Data dirs of a test run that was SIGKILLed (atexit never ran) would pile up in
    # /dev/shm; remove those whose owning process is gone. Live runs' dirs are kept.
    root = _tmp_root() or tempfile.gettempdir()
    for d in Path(root).glob(f"{prefix}*"):
        try:
            pid = int((d / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue
