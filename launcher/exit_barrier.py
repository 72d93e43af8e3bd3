"""torch's LocalElasticAgent (as launcher.torch_compat adapts it) with an exit barrier that says what it waits for and when to stop.

After its workers succeed, torch's agent waits (300 s by default; rdzv-launch's
`--exit-barrier-timeout`) until every node of the group has finished too, so that no node tears
down what a slower peer still uses. torch waits in silence, and for the full timeout when a
peer's workers failed: that peer never checks in. Here the barrier is the same (same store keys,
so nodes started by torchrun meet it too), but it reports progress, and it ends as soon as the
run is closed while the barrier is incomplete: nodes close the run on their way out, and a node
whose workers succeeded only leaves after the barrier completed (or gave up on it), so a close
before completion means a node left without finishing: its workers failed, or its rendezvous
did. (A node stopped by a signal does not close the run; for it the wait lasts until the
timeout, as in torch.)
"""

from __future__ import annotations

import time
from typing import Any

from torch.distributed.elastic.multiprocessing import SignalException

from launcher.report import Reporter
from launcher.torch_compat import CompatAgent

# torch's key names (torch.distributed.elastic.agent.server.api / utils.store).
TERMINAL_STATE_PREFIX = "torchelastic/agent/terminal_state"
NUM_MEMBERS_KEY = TERMINAL_STATE_PREFIX + "/num_members"
LAST_MEMBER_KEY = TERMINAL_STATE_PREFIX + "/last_member"

# The wait polls `check` (TCPStore's timed `wait` logs a warning per timeout); the interval
# starts short so the usual case, peers finishing together, ends at once.
FIRST_POLL = 0.02
MAX_POLL = 1.0
QUIET_FOR = 1.0


class ExitBarrierAgent(CompatAgent):
    def __init__(self, *args: Any, reporter: Reporter, progress_interval: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reporter = reporter
        self._progress_interval = progress_interval

    def _exit_barrier(self) -> None:
        group = self._worker_group
        nodes = group.group_world_size
        timeout = float(self._exit_barrier_timeout)
        self._in_exit_barrier = True
        try:
            wait_for_peers(
                self._store, nodes, group.spec.rdzv_handler, timeout, self._reporter, self._progress_interval
            )
        except SignalException:
            raise
        except Exception as exc:
            # As torch: the workers' result stands; say why the wait ended. (torch's store errors
            # carry a C++ stack dump after the first line.)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._reporter.warning(
                "exit_barrier_failed",
                f"stopped waiting for the other nodes to finish: {type(exc).__name__}: {reason}",
            )
        finally:
            self._in_exit_barrier = False


def wait_for_peers(
    store: Any, nodes: int, handler: Any, timeout: float, reporter: Reporter, progress_interval: float
) -> bool:
    """Check in and wait until all ``nodes`` did. False when the wait ended without them."""
    checked_in = store.add(NUM_MEMBERS_KEY, 1)
    if checked_in >= nodes:
        store.set(LAST_MEMBER_KEY, "<val_ignored>")
        return True
    started = time.monotonic()
    deadline = started + timeout
    # Peers usually finish within moments of each other: speak only if the wait lasts.
    next_report = started + QUIET_FOR
    reported = False
    poll = FIRST_POLL
    while not store.check([LAST_MEMBER_KEY]):
        if _closed(handler) and not store.check([LAST_MEMBER_KEY]):
            reporter.warning(
                "exit_barrier_abandoned",
                f"the run was closed while {_done(store, nodes)} of {nodes} nodes had finished: a node "
                "left without finishing; not waiting for it",
            )
            return False
        now = time.monotonic()
        if now >= deadline:
            reporter.warning(
                "exit_barrier_timeout",
                f"{_done(store, nodes)} of {nodes} nodes finished within {timeout:g} s; not waiting longer",
            )
            return False
        if now >= next_report:
            next_report = now + progress_interval
            done = _done(store, nodes)
            if not reported:
                reported = True
                reporter.info(
                    "exit_barrier",
                    f"workers finished; waiting up to {timeout:g} s for the other nodes to finish "
                    f"({done} of {nodes} done)",
                    done=done,
                    nodes=nodes,
                    timeout_s=timeout,
                )
            else:
                reporter.info(
                    "exit_barrier",
                    f"waiting for the other nodes to finish: {done} of {nodes} done after {now - started:.0f} s",
                    done=done,
                    nodes=nodes,
                )
        time.sleep(min(poll, deadline - now))
        poll = min(poll * 2, MAX_POLL)
    return True


def _closed(handler: Any) -> bool:
    """The run's closed flag; an error (backend briefly unreachable) counts as open: the store decides."""
    try:
        return bool(handler.is_closed())
    except Exception:
        return False


def _done(store: Any, nodes: int) -> int | str:
    """How many nodes checked in so far ("?" if the store cannot say)."""
    try:
        # `get` of a missing key blocks for the store's timeout: the round's store may be gone.
        if not store.check([NUM_MEMBERS_KEY]):
            return "?"
        return min(int(store.get(NUM_MEMBERS_KEY)), nodes)
    except Exception:
        return "?"
