"""One periodic thread per process for the backends whose stores have no native lease
keep-alive (etcd v2 over HTTP, torch's TCPStore): their handlers' keep-alives and heartbeats
run on it as short tasks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("rdzv")


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
