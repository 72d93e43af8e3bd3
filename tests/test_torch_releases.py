"""rdzv on each supported torch release (2.9 to 2.15): the range check, and the options an older
torch's agent lacks (launcher.torch_compat), with real launcher processes. CI runs this file on
torch 2.9, 2.13 and 2.15 (scripts/test)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from launcher_helpers import (
    ENV_DUMP,
    LAUNCH,
    ROOT,
    WAIT_FOR_STOP,
    clean_env,
    launchers,
    records,
    run_launcher,
    write_script,
)
from waiting import wait_until

from launcher import torch_compat
from launcher.settings import LaunchSettings
from rdzv import torch_support

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- the supported range


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("2.9.0", True),
        ("2.9.1+cu128", True),
        ("2.9.0a0+50eac811a6.nv25.10", True),  # NVIDIA's images build pre-releases
        ("2.11.0+cu130", True),
        ("2.15.0", True),
        ("2.8.0", False),
        ("1.13.1", False),
        ("2.16.0.dev20260101", False),
        ("3.0.0", False),
        ("unknown", False),
    ],
)
def test_supported_releases(version: str, supported: bool) -> None:
    problem = torch_support.problem_with(version)
    if supported:
        assert problem is None
    else:
        assert problem == f"torch {version} is installed; rdzv supports torch 2.9 to 2.15"


def test_pyproject_declares_the_checked_range() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert spec, "pyproject.toml must declare torch>=OLDEST,<NEXT"
    lo_major, lo_minor, hi_major, hi_minor = map(int, spec.groups())
    assert (lo_major, lo_minor) == torch_support.OLDEST
    assert (hi_major, hi_minor - 1) == torch_support.NEWEST


def test_the_installed_torch_is_supported() -> None:
    assert torch_support.installed_problem() is None


def _fake_torch_metadata(directory: Path, version: str) -> dict[str, str]:
    """An environment in which package metadata says torch `version` (torch itself unchanged)."""
    info = directory / "site" / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    return clean_env(PYTHONPATH=f"{info.parent}:{ROOT}")


def test_an_unsupported_torch_is_one_line_and_exit_2(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    env = _fake_torch_metadata(tmp_path, "2.8.0")
    proc = subprocess.run(
        [*LAUNCH, "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["rdzv-launch: error: torch 2.8.0 is installed; rdzv supports torch 2.9 to 2.15"]
    assert not records(tmp_path), "nothing is spawned"
    help_proc = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert help_proc.returncode == 0 and "--shutdown-timeout" in help_proc.stdout, "--help still answers"


def test_the_library_and_plugins_name_an_unsupported_torch(tmp_path: Path) -> None:
    """create_handler (which torchrun's plugins call too) raises before anything is built."""
    code = (
        "from torch.distributed.elastic.rendezvous import RendezvousParameters\n"
        "from rdzv.plugin import etcd_v3_creator\n"
        "from rdzv.torch_support import UnsupportedTorchError\n"
        "try:\n"
        "    etcd_v3_creator()(RendezvousParameters('etcd-v3', '127.0.0.1:1', 'job1', 1, 1))\n"
        "except UnsupportedTorchError as exc:\n"
        "    print(exc)\n"
    )
    env = _fake_torch_metadata(tmp_path, "2.16.0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "torch 2.16.0 is installed; rdzv supports torch 2.9 to 2.15", proc.stderr


# ---------------------------------------------------------------- what an older agent lacks


def _settings(**fields: object) -> LaunchSettings:
    """The LaunchSettings fields unhonoured_options reads."""
    base = {"virtual_local_rank": False, "duplicate_stdout_filters": [], "duplicate_stderr_filters": []}
    return types.SimpleNamespace(**{**base, **fields})  # type: ignore[return-value]


OLD = torch_compat.Features("2.9.1", frozenset({"role", "numa_options"}), False, False)
NEW = torch_compat.Features("2.15.0", frozenset(torch_compat.SPEC_FIELDS_SINCE) | {"role"}, True, True)


def test_an_option_an_older_torch_lacks_is_one_warning_each() -> None:
    s = _settings(virtual_local_rank=True, duplicate_stdout_filters=["loss"])
    notices = torch_compat.unhonoured_options(s, OLD)
    assert [n.message for n in notices] == [
        "--virtual-local-rank needs torch 2.10 or later (this is torch 2.9.1); ignored: workers get "
        "LOCAL_RANK 0..N-1 and see every GPU",
        "--duplicate-stdout-filters needs torch 2.10 or later (this is torch 2.9.1); ignored: no "
        "filtered copy is written",
    ]
    assert {n.level for n in notices} == {"warning"}
    assert not torch_compat.unhonoured_options(s, NEW)
    assert not torch_compat.unhonoured_options(_settings(), OLD)


def test_this_torch_takes_the_exit_barrier_timeout() -> None:
    """--exit-barrier-timeout goes to torch's agent by name: every supported release (CI: 2.9,
    2.13, 2.15) must take it, or the option would only reach our barrier."""
    assert torch_compat.features().agent_exit_barrier_timeout


def test_worker_spec_gets_only_the_fields_this_torch_has() -> None:
    f = torch_compat.features()
    assert f.version == torch_support.installed_version()
    spec = torch_compat.worker_spec(
        f, role="r", local_world_size=1, entrypoint="python", rdzv_handler=None,
        virtual_local_rank=False, duplicate_stdout_filters=None,
    )
    assert spec.role == "r"
    assert ("virtual_local_rank" in f.spec_fields) == hasattr(spec, "virtual_local_rank")


# Ignores SIGTERM (a worker stuck in a collective, or slow to save), then waits to be killed.
STUBBORN = ENV_DUMP + """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(0.05)
"""

def test_shutdown_timeout_on_every_release(tmp_path: Path) -> None:
    """torch < 2.12 waits a fixed 30 s between SIGTERM and SIGKILL; rdzv-launch honours the option."""
    script = write_script(tmp_path, "stubborn.py", STUBBORN)
    with launchers(tmp_path) as start:
        node = start(["--nproc-per-node=2", "--shutdown-timeout=1", str(script), str(tmp_path)])
        wait_until(lambda: len(records(tmp_path, 0)) == 2, 60, "both workers", node.describe)
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.wait(25) == 1, node.describe()
        took = time.monotonic() - started
    assert took < 15, f"stopped after {took:.1f} s: --shutdown-timeout=1 was not honoured"
    assert "stopped by SIGTERM" in node.stderr


def test_signals_to_handle_on_every_release(tmp_path: Path) -> None:
    """torch 2.9 handles a fixed set of signals; rdzv-launch handles the ones given."""
    script = write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    with launchers(tmp_path) as start:
        node = start(["--nproc-per-node=1", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", str(script), str(tmp_path)])
        wait_until(lambda: len(records(tmp_path, 0)) == 1, 60, "the worker", node.describe)
        node.signal(signal.SIGUSR1)
        assert node.wait(30) == 1, node.describe()  # unhandled, SIGUSR1 would end it with -10
    assert "stopped by SIGUSR1; workers were stopped" in node.stderr


def test_options_torch_2_10_added(tmp_path: Path) -> None:
    """--virtual-local-rank and --duplicate-stdout-filters: torch's behaviour from 2.10, one
    warning each (and the job runs) before."""
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    logs = tmp_path / "logs"
    rc, out, err = run_launcher(
        ["--nproc-per-node=2", "--virtual-local-rank", "--tee=3", f"--log-dir={logs}",
         "--duplicate-stdout-filters=ok", str(script), str(tmp_path)],
        tmp_path,
        env=clean_env(CUDA_VISIBLE_DEVICES="3,5"),
    )
    assert rc == 0, err
    recs = records(tmp_path, 0)
    warnings = [line for line in err.splitlines() if "needs torch 2.10 or later" in line]
    if "virtual_local_rank" in torch_compat.features().spec_fields:
        assert [(r["LOCAL_RANK"], r["CUDA_VISIBLE_DEVICES"]) for _, r in sorted(recs.items())] == [("0", "3"), ("0", "5")]
        (filtered,) = logs.glob("*/attempt_0/filtered_stdout.log")
        assert "worker 0 ok" in filtered.read_text()
        assert not warnings, err
    else:
        assert [(r["LOCAL_RANK"], r["CUDA_VISIBLE_DEVICES"]) for _, r in sorted(recs.items())] == [("0", "3,5"), ("1", "3,5")]
        version = torch_support.installed_version()
        assert warnings == [
            f"rdzv-launch: warning: --virtual-local-rank needs torch 2.10 or later (this is torch {version}); "
            "ignored: workers get LOCAL_RANK 0..N-1 and see every GPU",
            f"rdzv-launch: warning: --duplicate-stdout-filters needs torch 2.10 or later (this is torch {version}); "
            "ignored: no filtered copy is written",
        ], err
