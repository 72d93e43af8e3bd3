"""`rdzv events`: a run's rendezvous events, from a watch of its keys (no writes).

Without --follow: the events the current keys tell (nodes in, the sealed round, its last
call, closed), oldest change first, then exit. With --follow: those, then every event as it
happens until the run is closed and its keys are gone (or Ctrl-C).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rdzv.events import RUN_REMOVED, EventDeriver, RunEvent
from rdzv.inspect import RunNotFound, connect, norm_prefix, run_root
from rdzv.keyfeed import KeyFeed
from rdzv.view import RunView

TICK = 1.0  # seconds between checks for Ctrl-C while the watch is quiet


def run_events(
    endpoint: str,
    run_id: str,
    prefix: str,
    *,
    follow: bool,
    as_json: bool,
    conn: dict[str, Any],
    out: TextIO = sys.stdout,
) -> int:
    """Print the events; returns the exit code. Raises RunNotFound without --follow when the
    run has no keys, and etcd errors as they come."""
    root = run_root(prefix, run_id)
    with connect(endpoint, **conn) as client:
        feed = KeyFeed(client, root)
        view = RunView(run_id, root, time.time())
        deriver = EventDeriver(view)

        def emit(events: list[RunEvent]) -> bool:
            for event in events:
                out.write((event.to_json() if as_json else event.to_text()) + "\n")
            out.flush()
            return any(event.name == RUN_REMOVED for event in events)

        def fold(batch: list, live: bool) -> bool:
            now = time.time()
            return emit([e for ev in batch for e in deriver.derive(view.apply(ev, now, live))])

        fold(feed.start(), live=False)
        if not follow:
            if view.empty:
                raise RunNotFound(f"no run {run_id!r} under {norm_prefix(prefix) or '/'} at {endpoint}")
            return 0
        if view.empty:
            sys.stderr.write(f"rdzv: waiting for run {run_id!r} to appear under {root} at {endpoint}\n")
        while True:
            resyncs = feed.resyncs
            batch = feed.get(TICK)
            if batch and fold(batch, live=feed.resyncs == resyncs):
                return 0
