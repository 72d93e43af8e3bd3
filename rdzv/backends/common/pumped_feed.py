"""A `ChangeFeed` for stores without a native watch stream (etcd v2 over HTTP, torch's
TCPStore): a daemon thread blocks on the store and queues what it fetched for `poll`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import NodeChange
from rdzv.rendezvous.control import Control

# What a feed's fetch returns: node changes, and control updates as functions applied to
# `feed.control` in the thread that polls (so the algorithm never sees a half-applied change).
ControlUpdate = Callable[[Control], None]
Change = NodeChange | ControlUpdate

CLOSE_JOIN_TIMEOUT = 5.0


class PumpedFeed:
    """A `ChangeFeed` filled by a daemon thread that calls `fetch(wait)` in a loop.

    `fetch` blocks on the store for up to `wait` s and returns changes, or None when nothing
    happened. `poll(0)` then costs no request, which matters because torch's agent asks
    `num_nodes_waiting()` every monitor interval. A fetch error ends the pump and is raised by
    the next `poll`. `close` calls `on_close` at once but does not interrupt a blocked fetch:
    the thread ends when it returns (within `wait`), then calls `on_exit`.
    """

    def __init__(
        self,
        control: Control,
        fetch: Callable[[float], list[Change] | None],
        *,
        wait: float,
        name: str,
        on_close: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.control = control
        self._fetch = fetch
        self._wait = wait
        self._on_close = on_close
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._batches: deque[list[Change]] = deque()
        self._error: Exception | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name=name, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._closed:
                try:
                    batch = self._fetch(self._wait)
                except Exception as exc:  # noqa: BLE001 - handed to the polling thread
                    with self._cond:
                        self._error = exc
                        self._cond.notify_all()
                    return
                if batch:
                    with self._cond:
                        self._batches.append(batch)
                        self._cond.notify_all()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        with self._cond:
            if not self._batches and self._error is None and timeout != 0:
                self._cond.wait(timeout)
            if not self._batches:
                if self._error is not None:
                    error = self._error
                    if isinstance(error, RendezvousConnectionError):
                        raise error
                    raise RendezvousConnectionError(str(error)) from error
                return None
            batches = list(self._batches)
            self._batches.clear()
        out: list[NodeChange] = []
        for batch in batches:
            for change in batch:
                if isinstance(change, NodeChange):
                    out.append(change)
                else:
                    change(self.control)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()
        # With a waker (c10d) the pump leaves the store at once: wait for it (bounded), as a
        # thread still inside a TCPStore call at interpreter exit aborts the process.
        if self._on_close is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_JOIN_TIMEOUT)
