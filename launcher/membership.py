"""Worker failures told apart: a peer's departure (a membership change) or the job's own.

torch's agent charges every worker failure to --max-restarts, including those a departure
causes: a worker in a collective with a node that just left fails before the agent sees the
departure (pytorch#147064). Our handlers know who left (`departures()`), so before torch counts
a failure the agent (launcher.elastic_agent) asks `FailureAttribution.decide`:

* a member of the round left or was lost: restart as a membership change, not counted;
* nobody left and restarts remain: counted, as in torch. The handler reports it with the next
  round, whose coordinator still refunds it if a member is gone by the time the round forms;
* nobody left and no restarts remain: wait up to the handler's notice time for a departure (a
  killed peer is only seen once its lease lapsed), then give up as torch does.

The count is the job's, kept in the sealed round: after each rendezvous every node sets its
remaining restarts from it (`joined`), so TORCHELASTIC_RESTART_COUNT agrees across nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from launcher.report import Reporter
from rdzv.rendezvous.membership import Departures


class MembershipHandler(Protocol):
    """What rdzv's handlers offer beyond torch's interface (rdzv.rendezvous.handler)."""

    @property
    def notice_time(self) -> float: ...

    @property
    def restarts(self) -> int: ...

    @property
    def round(self) -> int | None: ...

    def departures(self) -> Departures: ...

    def count_failure(self) -> None: ...

    def is_closed(self) -> bool: ...

    def withdraw(self) -> None: ...

    def peers_moved_on(self) -> bool: ...

    def leave(self) -> None: ...


_METHODS = ("departures", "count_failure", "withdraw", "peers_moved_on", "leave", "is_closed")


def membership_of(handler: Any) -> MembershipHandler | None:
    """`handler` if it is one of ours (directly or through a wrapper), else None."""
    if all(callable(getattr(handler, name, None)) for name in _METHODS):
        return handler  # type: ignore[no-any-return]
    return None


class FailureAttribution:
    """Decides, for one agent, whether failed workers restart as a membership change."""

    def __init__(
        self,
        handler: MembershipHandler,
        reporter: Reporter,
        max_restarts: int,
        poll: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._handler = handler
        self._reporter = reporter
        self._max = max_restarts
        self._poll = max(poll, 0.01)
        self._clock = clock
        self._sleep = sleep
        self._used = 0  # the job's count as of the round last joined
        self._counted = False  # we asked the next round to charge a restart
        self._announced: Departures | None = None  # last departure reported while healthy

    def decide(self, remaining: int) -> bool:
        """Our workers failed; True: restart them as a membership change (not counted)."""
        gone = self._handler.departures()
        waited = None
        if not gone and remaining <= 0:
            started = self._clock()
            gone = self._await_departure()
            waited = self._clock() - started
        if gone:
            self._report(
                "membership_restart",
                f"workers failed after {gone.describe()}: membership restart; "
                f"{self._used} of {self._max} restarts used",
                self._used,
            )
            return True
        round_no = self._handler.round
        if remaining > 0:
            self._handler.count_failure()
            self._counted = True
            self._report(
                "counted_restart",
                f"workers failed with every node of round {round_no} still there: counted "
                f"restart; {self._used + 1} of {self._max} restarts used",
                self._used + 1,
            )
            return False
        if _closed(self._handler):
            why = "the run was closed by another node"
        elif waited:
            why = f"no node of round {round_no} left within {waited:.1f} s"
        else:  # the backend cannot see departures (static): nothing to wait for
            why = f"no node of round {round_no} left"
        self._report(
            "no_restarts_left",
            f"workers failed and {why}: no restarts left ({self._used} of {self._max} used); stopping",
            self._used,
            level="error",
        )
        return False

    def healthy(self) -> None:
        """Workers are fine; say once why torch is about to restart them, if a node left."""
        gone = self._handler.departures()
        if gone and gone != self._announced:
            self._announced = gone
            self._report(
                "membership_restart",
                f"{gone.describe()}: membership restart; {self._used} of {self._max} restarts used",
                self._used,
            )

    def joined(self) -> int:
        """After a rendezvous: the job's restarts as the new round says; returns how many
        remain for this agent."""
        used, before = self._handler.restarts, self._used
        round_no = self._handler.round
        if self._counted and used <= before:
            self._report(
                "restart_refunded",
                f"restart not counted after all: a node of the previous round was gone when round "
                f"{round_no} formed; {used} of {self._max} restarts used",
                used,
            )
        elif not self._counted and used > before:
            self._report(
                "counted_restart",
                f"round {round_no}: a worker failure on another node counted a restart; "
                f"{used} of {self._max} restarts used",
                used,
            )
        self._used, self._counted, self._announced = used, False, None
        return max(self._max - used, 0)

    def _await_departure(self) -> Departures:
        # A peer killed outright is only seen once its lease lapsed; our workers usually fail
        # first (their collective broke). Waiting that long tells the two cases apart.
        deadline = self._clock() + self._handler.notice_time
        while self._clock() < deadline and not _closed(self._handler):
            self._sleep(min(self._poll, max(deadline - self._clock(), 0.0)))
            gone = self._handler.departures()
            if gone:
                return gone
        return Departures()

    def _report(self, event: str, message: str, used: int, level: str = "info") -> None:
        self._reporter.emit(event, message, level, restarts_used=used, max_restarts=self._max)


def _closed(handler: MembershipHandler) -> bool:
    try:
        return bool(handler.is_closed())
    except Exception:  # a store outage: the departure wait decides
        return False
