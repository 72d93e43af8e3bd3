"""What the launcher tells its metrics, as one small interface, and the no-op used without them.

The agent (launcher.elastic_agent) and the handler wrapper (launcher.progress) call a
`Recorder` at the points where they learn something: a round formed, trouble was seen, workers
run again, a store request finished. Every call is made on the caller's thread and must be
cheap and non-blocking; `NullRecorder` (metrics off) does nothing. `Recovery` times the phases
of one recovery: trouble detected -> rendezvous started -> rendezvous completed -> workers running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rdzv.rendezvous.membership import GroupCounts

FAILURE = "failure"  # the job's restart budget paid for it: a worker failed with every node there
MEMBERSHIP = "membership"  # a node left, was lost, or joined: costs no restart
CAUSES = (FAILURE, MEMBERSHIP)
PHASES = ("stopping", "rendezvous", "starting", "total")


class Recorder(Protocol):
    def rendezvous_started(self) -> None: ...

    def rendezvous_completed(self, round_no: int | None, group_size: int, node_rank: int, seconds: float) -> None: ...

    def nodes_waiting(self, waiting: int, counts: GroupCounts | None) -> None:
        """torch's `num_nodes_waiting()` answer, and our handler's breakdown when it has one."""
        ...

    def trouble(self, cause: str) -> None:
        """The agent saw a reason to restart (the first one of a recovery counts)."""
        ...

    def restart_attributed(self, charged: bool | None) -> None:
        """After a recovery's rendezvous: whether the job's restart budget paid for it (None:
        the handler does not say; the cause seen at detection stands)."""
        ...

    def workers_running(self) -> None: ...

    def health_check_failed(self) -> None:
        """A --health-check failed: this node stays out of the next round for now."""
        ...

    def store_request(self, op: str, seconds: float, error: BaseException | None) -> None: ...

    def watch_worker_group(self, state: Callable[[], str]) -> None:
        """`state()` names the worker group's state; read when metrics are collected."""
        ...

    def watch_keep_alive(self, lag: Callable[[], float | None]) -> None:
        """`lag()` is the handler's keep-alive lag (None: unknown); read when collected."""
        ...


class NullRecorder:
    """Metrics off: every call is a no-op."""

    def rendezvous_started(self) -> None:
        pass

    def rendezvous_completed(self, round_no: int | None, group_size: int, node_rank: int, seconds: float) -> None:
        pass

    def nodes_waiting(self, waiting: int, counts: GroupCounts | None) -> None:
        pass

    def trouble(self, cause: str) -> None:
        pass

    def restart_attributed(self, charged: bool | None) -> None:
        pass

    def workers_running(self) -> None:
        pass

    def health_check_failed(self) -> None:
        pass

    def store_request(self, op: str, seconds: float, error: BaseException | None) -> None:
        pass

    def watch_worker_group(self, state: Callable[[], str]) -> None:
        pass

    def watch_keep_alive(self, lag: Callable[[], float | None]) -> None:
        pass


NULL_RECORDER = NullRecorder()


@dataclass
class Recovery:
    """One recovery's timeline (monotonic seconds)."""

    detected: float
    cause: str
    rendezvous_started: float | None = None
    rendezvous_completed: float | None = None

    def phases(self, running: float) -> dict[str, float]:
        """Seconds per phase once workers run again; phases not seen are left out."""
        out = {"total": running - self.detected}
        if self.rendezvous_started is not None:
            out["stopping"] = self.rendezvous_started - self.detected
            if self.rendezvous_completed is not None:
                out["rendezvous"] = self.rendezvous_completed - self.rendezvous_started
        if self.rendezvous_completed is not None:
            out["starting"] = running - self.rendezvous_completed
        return out


class RecoveryTracker:
    """Follows the agent through recoveries; `finish` hands back the phases of a finished one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._running = False
        self._current: Recovery | None = None

    @property
    def current(self) -> Recovery | None:
        return self._current

    def trouble(self, cause: str) -> None:
        if self._running and self._current is None:
            self._current = Recovery(self._clock(), cause)

    def rendezvous_started(self) -> None:
        current = self._current
        if current is not None and current.rendezvous_started is None:
            current.rendezvous_started = self._clock()

    def rendezvous_completed(self) -> None:
        # A round abandoned before ranks were assigned is followed by another: the last counts.
        if self._current is not None:
            self._current.rendezvous_completed = self._clock()

    def attribute(self, charged: bool | None) -> str | None:
        """The recovery's cause, final now (None: no recovery in progress)."""
        current = self._current
        if current is None:
            return None
        if charged is not None:
            current.cause = FAILURE if charged else MEMBERSHIP
        return current.cause

    def finish(self) -> tuple[str, dict[str, float]] | None:
        """Workers run: (cause, phases) of the recovery that ends here, if one was running."""
        self._running = True
        current, self._current = self._current, None
        if current is None:
            return None
        return current.cause, current.phases(self._clock())
