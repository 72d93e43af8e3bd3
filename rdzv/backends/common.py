"""Pieces shared by the backends whose stores have no native watch stream or lease keep-alive
(etcd v2 over HTTP, torch's TCPStore): one periodic thread per process, and a change feed
filled by a thread that blocks on the store.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import NodeChange
from rdzv.rendezvous.model import Control, RecordError, RoundRecord, guard

log = logging.getLogger("rdzv")

# What a feed's fetch returns: node changes, and control updates as functions applied to
# `feed.control` in the thread that polls (so the algorithm never sees a half-applied change).
ControlUpdate = Callable[[Control], None]
Change = NodeChange | ControlUpdate


def to_bytes(value: str | bytes | list[int]) -> bytes:
    """torch passes Store values as str, bytes or a list of ints."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


# Stores without multi-key transactions keep the sealed round and the closed flag in ONE value
# (the "state document"), so that a single compare-and-set seals a round only if the run is
# still open, and closing cannot slip in between a check and a seal.
def encode_state(sealed: RoundRecord | None, closed: bool) -> str:
    """`sealed.cursor` is kept in the document (as "rev"): it is where members start watching."""
    doc = {
        "closed": closed,
        "rev": sealed.cursor if sealed is not None else 0,
        "sealed": json.loads(sealed.encode()) if sealed is not None else None,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def apply_state(control: Control, raw: str | bytes | None, key: str) -> None:
    """Set `control` from the state document stored at `key` (None/empty: no round sealed, run
    open). One that does not decode leaves `control` as it was, noted in `control.corrupt`."""
    with guard(control, key):
        if not raw:
            control.sealed, control.closed, control.token = None, False, None
            return
        sealed, closed = _decode_state(raw)
        control.sealed, control.closed, control.token = sealed, closed, raw


def _decode_state(raw: str | bytes) -> tuple[RoundRecord | None, bool]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RecordError(f"not JSON: {raw[:60]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("closed"), bool):
        raise RecordError("not a state document (no 'closed' flag)")
    rev, record = doc.get("rev", 0), doc.get("sealed")
    if not isinstance(rev, int) or isinstance(rev, bool) or rev < 0:
        raise RecordError(f"'rev' must be an integer >= 0, not {rev!r}"[:120])
    if record is not None and not isinstance(record, dict):
        raise RecordError("'sealed' must be a round record or null")
    sealed = RoundRecord.decode(json.dumps(record), rev) if record is not None else None
    return sealed, doc["closed"]


class Ticker:
    """Runs registered tasks every `interval` seconds on one daemon thread per process.

    Every handler in a process (hundreds in the formation benchmark) shares it, so liveness
    costs one thread, not one per node. Tasks must be short and bounded by their own timeouts:
    they run one after another.
    """

    _instance: Ticker | None = None
    _instance_lock = threading.Lock()
    _ids = itertools.count(1)  # per process, not per instance: tokens stay unique across a fork

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._tasks: dict[int, tuple[float, Callable[[], None]]] = {}
        self._thread: threading.Thread | None = None

    @classmethod
    def _forget_after_fork(cls) -> None:
        # A fork()ed child has no ticker thread. The parent's tasks (its handlers' keep-alives,
        # on the parent's connections) must not run here once a child handler restarts it.
        cls._instance = None
        cls._instance_lock = threading.Lock()

    @classmethod
    def shared(cls) -> Ticker:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def add(self, interval: float, task: Callable[[], None], *, first: float | None = None) -> int:
        """Run `task` every `interval` s, the first time after `first` s (default: interval)."""
        with self._cond:
            token = next(self._ids)
            self._tasks[token] = (interval, task)
            heapq.heappush(self._heap, (time.monotonic() + (interval if first is None else first), token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rdzv-ticker", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def remove(self, token: int | None) -> None:
        if token is None:
            return
        with self._cond:
            self._tasks.pop(token, None)  # its heap entry is skipped when it comes due

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][1] not in self._tasks:
                        heapq.heappop(self._heap)
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        _, token = heapq.heappop(self._heap)
                        interval, task = self._tasks[token]
                        break
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
            started = time.monotonic()
            try:
                task()
            except Exception:  # noqa: BLE001 - one failing task must not stop the others
                log.exception("rdzv periodic task failed")
            with self._cond:
                if token in self._tasks:
                    heapq.heappush(self._heap, (started + interval, token))


os.register_at_fork(after_in_child=Ticker._forget_after_fork)

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
