"""`--health-check`: a node proves itself before it joins, or stays out of the round.

When (`--health-check-when`): `first-and-failure` (the default) runs it at the node's first join
and at the next join after the node's own failure (its workers failed and no peer's departure
explains it, launcher.membership; or its check failed); a re-formation caused by another node
(a departure, a newcomer, a peer's workers failing) skips it, so a check of 10-30 s
(`builtin:gpu`) is not on the critical path of every re-formation. `every-join` runs it before
every join, re-formations included.

The check is a command (`--health-check CMD`, split like a shell would, or `builtin:gpu`,
`launcher.health.gpu`) run in its own process group with a timeout: exit status 0 passes;
anything else, or no answer within `--health-check-timeout`, fails, and the whole process group
is killed. A node whose check fails says why in one line (event `health_check_failed`), takes
its record out of the run if it was a member (the others re-form without it, as after a
departure), and tries again after a jittered backoff, until the check passes or the run closes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launcher.problems import LaunchFailed, UsageProblem
from launcher.report import Reporter
from rdzv.backoff import Backoff

BUILTINS = {"builtin:gpu": [sys.executable, "-m", "launcher.health.gpu"]}
DEFAULT_TIMEOUT = 120.0  # seconds: a GPU check on 8 devices with an all-reduce takes ~10-30 s
BACKOFF_FIRST = 2.0  # seconds before the first retry, doubled per failure up to BACKOFF_MAX
BACKOFF_MAX = 60.0
OUTPUT_SHOWN = 200  # characters of the check's last output line in the message
# --health-check-when values; the first is the default.
FIRST_AND_FAILURE = "first-and-failure"
EVERY_JOIN = "every-join"
WHEN = (FIRST_AND_FAILURE, EVERY_JOIN)


def parse_health_check(text: str | None) -> list[str] | None:
    """The command of `--health-check`, checked (None: no check)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.startswith("builtin:"):
        if text not in BUILTINS:
            raise UsageProblem(f"--health-check: unknown built-in check {text!r} (known: {', '.join(BUILTINS)})")
        return list(BUILTINS[text])
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageProblem(f"--health-check: cannot split {text!r} into a command: {exc}") from None
    if shutil.which(argv[0]) is None:
        raise UsageProblem(f"--health-check: no such command {argv[0]!r} (not executable, not on PATH)")
    return argv


def parse_health_timeout(seconds: float) -> float:
    if not seconds > 0:
        raise UsageProblem(f"--health-check-timeout must be more than 0 seconds, got {seconds:g}")
    return seconds


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    seconds: float
    why: str  # the failure, or the check's last line of output when it passed


def run_check(argv: list[str], timeout: float) -> CheckResult:
    """Run the check once; a check still running at `timeout` is killed with its children."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
    except OSError as exc:  # removed or made unexecutable since the launcher checked it
        return CheckResult(False, 0.0, f"cannot run it: {exc.strerror or exc}")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return CheckResult(False, time.monotonic() - started, f"no answer within {timeout:g} s (killed)")
    except BaseException:
        _kill_group(proc)  # interrupted (a signal to the launcher): leave nothing behind
        raise
    finally:
        _kill_group(proc, only_leftovers=True)
    took = time.monotonic() - started
    last = _last_line(out)
    if proc.returncode == 0:
        return CheckResult(True, took, last)
    status = f"exit code {proc.returncode}" if proc.returncode > 0 else f"killed by {_signal_name(-proc.returncode)}"
    return CheckResult(False, took, status + (f": {last}" if last else ""))


def _kill_group(proc: subprocess.Popen[bytes], only_leftovers: bool = False) -> None:
    """SIGKILL the check's process group (after it ended: whatever it left running)."""
    if only_leftovers and proc.returncode is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        proc.wait()


def _last_line(out: bytes | None) -> str:
    lines = (out or b"").decode(errors="replace").strip().splitlines()
    return lines[-1].strip()[:OUTPUT_SHOWN] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class HealthGate:
    """Runs the check before a join where it is due (`launcher.elastic_agent`); returns once it passed."""

    def __init__(
        self,
        argv: list[str],
        timeout: float,
        reporter: Reporter,
        *,
        every_join: bool = False,
        on_failure: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.argv = argv
        self.timeout = timeout
        self._reporter = reporter
        self._on_failure = on_failure  # metrics: one failed check
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._passed_before = False
        self._every_join = every_join
        self._due = True  # the first join always checks
        self._after_failure = False  # due because this node's workers failed

    def describe(self) -> str:
        return "builtin:gpu" if self.argv == BUILTINS["builtin:gpu"] else shlex.join(self.argv)

    @property
    def due(self) -> bool:
        """Whether the next join runs the check."""
        return self._every_join or self._due

    def workers_failed(self) -> None:
        """This node's own workers failed (no departure explains it): check before the next join."""
        self._due = self._after_failure = True

    def before_join(self, handler: Any) -> None:
        """Run the check if it is due (`pass_before_join`); else return at once."""
        if self.due:
            self.pass_before_join(handler)

    def pass_before_join(self, handler: Any) -> None:
        """Block until the check passes. While it fails, this node is out of the group (its
        record taken out of a round it was in) and retries with backoff; if the run closes
        meanwhile, LaunchFailed says the node never passed. Until it passed, the check stays due
        (an interrupted wait checks again at the next join)."""
        failures = 0
        # Pauses in [cap/2, cap]: a group's failing nodes do not all come back together.
        backoff = Backoff(BACKOFF_FIRST, BACKOFF_MAX, floor=0.5, rng=self._rng)
        while True:
            result = run_check(self.argv, self.timeout)
            if result.ok:
                said = f": {result.why}" if result.why else ""
                if failures:
                    self._reporter.emit("health_check_passed", f"health check passed after {failures} failure(s) "
                                        f"({result.seconds:.1f} s){said}; joining", "info", seconds=round(result.seconds, 3))
                elif not self._passed_before:
                    # Once per process: what the check found (devices, times) is worth a line.
                    self._reporter.emit("health_check_passed", f"health check `{self.describe()}` passed in "
                                        f"{result.seconds:.1f} s{said}", "info", seconds=round(result.seconds, 3))
                elif self._after_failure:
                    # Says why this re-formation took the check's time, when it did.
                    self._reporter.emit("health_check_passed", f"health check passed again after this node's "
                                        f"workers failed ({result.seconds:.1f} s){said}; joining", "info",
                                        seconds=round(result.seconds, 3))
                self._passed_before = True
                self._due = self._after_failure = False
                return
            failures += 1
            self._on_failure()
            delay = backoff.pause()
            self._reporter.emit(
                "health_check_failed",
                f"health check `{self.describe()}` failed ({result.why}): this node stays out of the "
                f"round; retrying in {delay:.0f} s",
                "warning", why=result.why, seconds=round(result.seconds, 3), failures=failures,
            )
            stand_aside = getattr(handler, "stand_aside", None)
            if failures == 1 and callable(stand_aside):
                stand_aside()
            if self._closed_within(handler, delay):
                raise LaunchFailed(f"the run was closed while this node's health check kept failing ({result.why})")

    def _closed_within(self, handler: Any, delay: float) -> bool:
        """Wait `delay` s, looking each second whether the run closed (it ended without us)."""
        deadline = self._clock() + delay
        while True:
            if handler.is_closed():
                return True
            left = deadline - self._clock()
            if left <= 0:
                return False
            self._sleep(min(left, 1.0))
