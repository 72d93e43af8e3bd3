"""Riding out a store outage while a node joins: retry with backoff until the join's deadline.

A store that stalls, restarts, sheds load or loses its quorum for a while must not end a job
that can go on once it is back: the join is simply tried again. Only `StoreUnreachableError`
(the backend's "no answer in time"; a narrower class where the caller says so) is retried;
credential, TLS, protocol and state errors end the join at once. Pauses are drawn at random
below a doubling cap, so that nodes turned away together do not all come back together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import StoreBusyError, StoreUnreachableError
from rdzv.backoff import Backoff

log = logging.getLogger("rdzv")

T = TypeVar("T")

# The pause before a retry starts at RETRY_FIRST s and doubles up to RETRY_MAX; the warning
# repeats at most every WARN_EVERY s (one line per node, not one per request).
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
WARN_EVERY = 30.0


def ride_out(
    attempt: Callable[[], T],
    deadline: Callable[[], float],
    *,
    run_id: str,
    where: str,
    join_timeout: float,
    retried: type[StoreUnreachableError] = StoreUnreachableError,
) -> T:
    """`attempt()` until it returns, retrying it while it raises `retried` and the monotonic
    `deadline()` (read again before each retry: a spare's moves on) is ahead."""
    since: float | None = None  # when the first failed attempt began
    warned: float | None = None
    # At least a tenth of the cap: a pause of ~0 would only add load.
    pauses = Backoff(RETRY_FIRST, RETRY_MAX, floor=0.1)
    while True:
        started = time.monotonic()
        try:
            result = attempt()
        except retried as exc:
            since = started if since is None else since
            now = time.monotonic()
            end = deadline()
            state = "not answering" if isinstance(exc, StoreBusyError) else "unreachable"
            if now >= end:
                raise RendezvousConnectionError(
                    f"rendezvous '{run_id}': {where} {state} for {now - since:.0f} s, past "
                    f"join_timeout ({join_timeout:g} s); last error: {exc}"
                ) from exc
            if warned is None or now - warned >= WARN_EVERY:
                warned = now
                until = time.strftime("%H:%M:%S", time.localtime(time.time() + end - now))
                log.warning(
                    "rendezvous %s: %s %s for %.0f s, retrying until %s (join_timeout): %s",
                    run_id, where, state, now - since, until, exc,
                )
            pauses.sleep(end)
            continue
        if warned is not None and since is not None:
            log.warning("rendezvous %s: %s answers again after %.0f s", run_id, where, time.monotonic() - since)
        return result
