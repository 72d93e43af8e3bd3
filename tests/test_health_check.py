"""--health-check on CPU: bad values (one line, exit 2), failing and hanging commands (a hang is
killed at the timeout with what it started), the gate's retries, builtin:gpu with mocked
devices, and the NVLink default of --node-segment with a mocked pynvml."""

from __future__ import annotations

import ctypes
import sys
import time
import types
from pathlib import Path

import pytest
from launcher_helpers import ROOT, run_launcher
from waiting import wait_until

from launcher.health import gpu as gpu_check
from launcher.health.gate import HealthGate, parse_health_check, run_check
from launcher.nvlink import nvlink_segment
from launcher.problems import LaunchFailed, UsageProblem
from launcher.report import Reporter

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("builtin:cpu", "--health-check: unknown built-in check 'builtin:cpu' (known: builtin:gpu)"),
        ("no-such-check --now", "--health-check: no such command 'no-such-check'"),
        ("check 'unterminated", "--health-check: cannot split"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(value: str, message: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    started = time.monotonic()
    rc, _, err = run_launcher(["--health-check", value, str(script)], tmp_path)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert time.monotonic() - started < 10, "answered before torch loads"


def test_bad_timeout_and_segment_size(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    rc, _, err = run_launcher(["--health-check-timeout=0", str(script)], tmp_path)
    assert rc == 2 and "--health-check-timeout must be more than 0" in err, err
    args = ["--nnodes=2:4", "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=x", "--rdzv-conf=segment_size=5", str(script)]
    rc, _, err = run_launcher(args, tmp_path)
    assert rc == 2 and err.count("\n") == 1 and "no multiple of 5 lies between min nodes 2 and max nodes 4" in err, err


def test_builtin_is_the_gpu_check_module() -> None:
    assert parse_health_check("builtin:gpu") == [sys.executable, "-m", "launcher.health.gpu"]
    assert parse_health_check("") is None
    assert parse_health_check("true --x 'a b'") == ["true", "--x", "a b"]


def test_a_failing_command_says_why_in_its_last_line() -> None:
    result = run_check([sys.executable, "-c", "print('noise'); print('GPU 2: fell off the bus'); raise SystemExit(4)"], 30)
    assert not result.ok and result.why == "exit code 4: GPU 2: fell off the bus"
    assert run_check(["true"], 30).ok


def test_a_hanging_command_is_killed_at_the_timeout_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The check starts a child that would outlive it, then hangs. A shell script: it starts in
    # milliseconds, where a Python one on a loaded machine could still be starting at the timeout.
    hang = f"sleep 600 & echo $$ $! > {pids}; sleep 600"
    result = run_check(["sh", "-c", hang], 3)
    assert not result.ok and result.why == "no answer within 3 s (killed)"
    for pid in map(int, pids.read_text().split()):
        # SIGKILLed with its group: gone as soon as the kernel has run it down (a loaded
        # machine may take a moment; a survivor would stay).
        wait_until(lambda pid=pid: not _running(pid), 10, f"process {pid} of the check to end")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


class FakeHandler:
    def __init__(self, closed_after: int | None = None) -> None:
        self.asides = 0
        self.looks = 0
        self.closed_after = closed_after

    def stand_aside(self) -> None:
        self.asides += 1

    def is_closed(self) -> bool:
        self.looks += 1
        return self.closed_after is not None and self.looks > self.closed_after


def test_the_gate_retries_with_backoff_until_the_check_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "healthy-after"
    marker.write_text("2")
    # Fails twice, then passes.
    check = [sys.executable, "-c", f"import pathlib, sys; p = pathlib.Path({str(marker)!r}); n = int(p.read_text()); "
             "p.write_text(str(n - 1)); sys.exit(1 if n > 0 else 0)"]
    slept: list[float] = []
    failures: list[int] = []
    gate = HealthGate(check, 30, Reporter("rdzv-launch", "json", False), sleep=slept.append,
                      clock=lambda: sum(slept), on_failure=lambda: failures.append(1))
    handler = FakeHandler()
    gate.pass_before_join(handler)
    err = capsys.readouterr().err
    assert err.count('"event": "health_check_failed"') == 2 and '"event": "health_check_passed"' in err, err
    assert handler.asides == 1 and len(failures) == 2, "out of the group once, both failures counted"
    # Backoff: about 2 s then about 4 s (jittered down to half), looking at the run each second.
    assert 1 <= sum(slept) <= 6 and all(0 < s <= 1.0 for s in slept) and handler.looks == len(slept) + 2


def test_the_gate_gives_up_when_the_run_closes() -> None:
    gate = HealthGate(["false"], 30, Reporter("rdzv-launch", "text", True), sleep=time.sleep)
    with pytest.raises(LaunchFailed, match="the run was closed while this node's health check kept failing"):
        gate.pass_before_join(FakeHandler(closed_after=2))


def _counting_check(tmp_path: Path) -> tuple[list[str], Path]:
    """A passing check that appends one line to a file per run."""
    runs = tmp_path / "runs"
    return ["sh", "-c", f"echo run >> {runs}"], runs


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_the_check_runs_at_the_first_join_and_after_own_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check, runs = _counting_check(tmp_path)
    gate = HealthGate(check, 30, Reporter("rdzv-launch", "text", False))
    handler = FakeHandler()
    assert gate.due
    gate.before_join(handler)
    gate.before_join(handler)  # a re-formation another node caused
    gate.before_join(handler)
    assert _runs(runs) == 1 and not gate.due
    gate.workers_failed()
    assert gate.due
    gate.before_join(handler)
    gate.before_join(handler)
    assert _runs(runs) == 2
    err = capsys.readouterr().err
    assert "health check `sh -c" in err and "health check passed again after this node's workers failed" in err, err


def test_every_join_runs_the_check_at_each_join(tmp_path: Path) -> None:
    check, runs = _counting_check(tmp_path)
    gate = HealthGate(check, 30, Reporter("rdzv-launch", "text", True), every_join=True)
    for _ in range(3):
        gate.before_join(FakeHandler())
    assert _runs(runs) == 3 and gate.due


def test_a_check_that_never_passed_stays_due(tmp_path: Path) -> None:
    gate = HealthGate(["false"], 30, Reporter("rdzv-launch", "text", True), sleep=time.sleep)
    with pytest.raises(LaunchFailed):
        gate.before_join(FakeHandler(closed_after=1))
    assert gate.due, "the run closed before it passed: the next join checks again"


def test_health_check_when_is_an_option(tmp_path: Path) -> None:
    from launcher import cli, config
    from launcher.health.gate import WHEN

    script = tmp_path / "train.py"
    script.write_text("")
    for args, expected in (([], "first-and-failure"), (["--health-check-when=every-join"], "every-join")):
        values, given = cli.parse(["--standalone", *args, str(script)], "rdzv-launch")  # type: ignore[misc]
        assert config.build_settings(values, given, False).health_check_when == expected
    assert WHEN == ("first-and-failure", "every-join")
    rc, _, err = run_launcher(["--health-check-when=sometimes", str(script)], tmp_path)
    assert rc == 2 and err.count("\n") == 1 and "'sometimes' is not one of 'first-and-failure', 'every-join'" in err, err


class FakeTorch:
    """torch with `count` accelerators that are really the CPU (the checks are device-agnostic)."""

    def __init__(self, torch: types.ModuleType, count: int) -> None:
        self.real, self.count = torch, count
        self.accelerator = types.SimpleNamespace(
            is_available=lambda: count > 0, device_count=lambda: count,
            current_accelerator=lambda: torch.device("cpu"), synchronize=lambda d: None,
        )

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_gpu_check_visits_every_device_and_runs_one_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    fake = FakeTorch(torch, 2)
    monkeypatch.setitem(sys.modules, "torch", fake)
    reduced: list[tuple[str, int]] = []
    monkeypatch.setattr(gpu_check, "all_reduce", lambda kind, n: reduced.append((kind, n)) or 0.5)
    lines: list[str] = []
    assert gpu_check.run(lines.append) == 0
    assert len([line for line in lines if "matmul checked" in line]) == 2, lines
    assert reduced == [("cpu", 2)] and lines[-1] == "2 device(s) passed"


def test_gpu_check_without_an_accelerator_says_so_and_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "torch", FakeTorch(torch, 0))
    lines: list[str] = []
    assert gpu_check.run(lines.append) == 0 and lines == ["no accelerator visible: nothing to check (passed)"]


def test_gpu_check_reports_a_wrong_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "torch", FakeTorch(torch, 1))
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: False if a.shape == (512, 512) else real_equal(a, b))
    lines: list[str] = []
    assert gpu_check.run(lines.append) == 1
    assert lines[-1].startswith("cpu:0: FAILED: RuntimeError: matmul differs from the CPU's"), lines


def test_the_all_reduce_runs_across_processes() -> None:
    assert gpu_check.all_reduce("cpu", 2) > 0  # gloo: what NCCL does across GPUs


def test_builtin_gpu_passes_on_a_machine_without_accelerators() -> None:
    result = run_check([sys.executable, "-m", "launcher.health.gpu"], 60)
    assert result.ok and result.why == "no accelerator visible: nothing to check (passed)", result


class FabricInfo(ctypes.Structure):
    _fields_ = [("clusterUuid", ctypes.c_char * 16), ("status", ctypes.c_uint), ("cliqueId", ctypes.c_uint),
                ("state", ctypes.c_ubyte)]


def _fake_pynvml(uuids: list[bytes], state: int = 3) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(uuids)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]

    def fabric(i: int) -> FabricInfo:
        info = FabricInfo(state=state)
        ctypes.memmove(ctypes.addressof(info), uuids[i], 16)
        return info

    module.nvmlDeviceGetGpuFabricInfo = fabric  # type: ignore[attr-defined]
    return module


def test_node_segment_defaults_to_the_nvlink_cluster_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    rack = bytes(range(16))  # a zero byte first: read from memory, not as a C string
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([rack] * 4))
    assert nvlink_segment() == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([rack, bytes(16)]))
    assert nvlink_segment() == "00010203-0405-0607-0809-0a0b0c0d0e0f", "a GPU without one does not count"
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([rack, b"\x01" * 16]))
    assert nvlink_segment() is None, "two domains on one node: no default"
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([rack], state=1))
    assert nvlink_segment() is None, "fabric registration not complete"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert nvlink_segment() is None


def test_node_segment_option_reaches_the_rendezvous(tmp_path: Path) -> None:
    from launcher.config import build_settings
    from launcher.options import OPTIONS

    values = {o.dest: o.default for o in OPTIONS}
    values.update(training_script=str(ROOT / "examples" / "train_ddp.py"), training_script_args=(),
                  node_segment="rack7", nnodes="1", standalone=True)
    settings = build_settings(values, set(), False)
    assert settings.rdzv_configs["segment"] == "rack7"
    values["node_segment"] = " "
    with pytest.raises(UsageProblem, match="--node-segment must be 1 to 128 printable characters"):
        build_settings(values, set(), False)
