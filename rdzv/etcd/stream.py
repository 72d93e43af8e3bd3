"""What the client's two long-lived bidi streams (keep-alives, watches) share.

Each owner feeds its gRPC request iterator from a queue, holds the live call, and reads the
responses on one daemon thread; tearing down ends the iterator and cancels the call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

CLOSE = object()  # sentinel that ends a request iterator


def requests(outbox: queue.SimpleQueue[object]) -> Iterator[Any]:
    """The request iterator handed to gRPC: whatever is queued, until CLOSE."""
    while True:
        item = outbox.get()
        if item is CLOSE:
            return
        yield item


class StreamOwner:
    """Base for LeaseKeeper and WatchHub: `_run` is the reader loop they each implement."""

    THREAD_NAME = "rdzv-etcd-stream"
    _thread: threading.Thread | None
    _queue: queue.SimpleQueue[object] | None
    _call: Any

    def _run(self) -> None:
        raise NotImplementedError

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
            self._thread.start()

    def _teardown_locked(self) -> None:
        if self._queue is not None:
            self._queue.put(CLOSE)
            self._queue = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
