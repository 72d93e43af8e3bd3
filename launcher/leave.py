"""A node stopped by a signal leaves its group before it stops its workers.

Without this the node's workers die first: the other nodes' workers fail in their next
collective, before the departure is visible (it would be once the lease lapsed), and torch's
agent charges that to --max-restarts. So on SIGTERM/SIGINT the agent first withdraws from the
run (its record goes at once; the run stays open for the others), then waits a little until
every other member of the round has asked for a new round, i.e. has stopped its workers as a
membership change, and only then lets torch stop this node's workers with the signal.
"""

from __future__ import annotations

import signal
import time

from torch.distributed.elastic.multiprocessing import SignalException

from launcher.membership import MembershipHandler
from launcher.report import Reporter

# How long a leaving node waits for the others to restart. They notice within a monitor
# interval (0.1 s) and ask for a new round once their workers stopped: normally well under a
# second. A second signal ends the wait at once.
LEAVE_GRACE = 5.0
POLL = 0.05


def leave_gracefully(
    handler: MembershipHandler,
    reporter: Reporter,
    sig: signal.Signals,
    *,
    workers_running: bool,
    grace: float = LEAVE_GRACE,
) -> None:
    """Withdraw from the run and, if our workers still run with the others', wait (up to
    `grace` s) until the other members restarted. Never raises: the signal's stop goes on."""
    name = signal.Signals(sig).name
    started = time.monotonic()
    try:
        handler.withdraw()
        if not workers_running:
            reporter.info("left_group", f"{name}: left the group; stopping")
            return
        deadline = started + grace
        while not handler.peers_moved_on() and time.monotonic() < deadline:
            time.sleep(POLL)
        took = time.monotonic() - started
        if handler.peers_moved_on():
            message = f"the other nodes restarted without this node after {took:.1f} s"
        else:
            message = f"the other nodes had not restarted within {grace:g} s"
        reporter.info("left_group", f"{name}: left the group; {message}; stopping the workers", waited_s=round(took, 3))
    except SignalException as again:
        reporter.warning("left_group", f"{signal.Signals(again.sigval).name} again: stopping the workers at once")
    except Exception as exc:  # best effort: the node stops either way
        reporter.warning("left_group", f"{name}: could not leave the group first: {type(exc).__name__}: {exc}")
