"""A hook for watching a backend's store requests: how long each took and whether it failed.

`ObservedBackend` wraps a `Backend` and tells a `BackendObserver` about every call
that is one request (or one short exchange) to the store: announce, seal, read_control, ...
Waiting on a feed (`ChangeFeed.poll`) is not a request and is not reported. The observer is
called on the caller's thread after the request; it must be cheap and never raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from rdzv.backends.api import Backend

# Backend methods that talk to the store once per call; the rest pass through untimed.
REQUESTS = (
    "open_session",
    "read_control",
    "announce",
    "read_nodes",
    "count_nodes",
    "watch",
    "watch_round",
    "seal",
    "publish_last_call",
    "publish_progress",
    "retract",
    "close_run",
    "withdraw",
    "leave",
)


class BackendObserver(Protocol):
    def store_request(self, op: str, seconds: float, error: BaseException | None) -> None:
        """`op` (a backend method name) took `seconds`; `error` is what it raised, if anything."""
        ...


class ObservedBackend:
    """Delegates everything to `inner`; the calls named in REQUESTS are timed for `observer`."""

    def __init__(self, inner: Backend, observer: BackendObserver) -> None:
        self._inner = inner
        self._observer = observer
        for op in REQUESTS:
            setattr(self, op, self._timed(op, getattr(inner, op)))

    def _timed(self, op: str, call: Callable[..., Any]) -> Callable[..., Any]:
        observer = self._observer

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = call(*args, **kwargs)
            except BaseException as exc:
                observer.store_request(op, time.perf_counter() - started, exc)
                raise
            observer.store_request(op, time.perf_counter() - started, None)
            return result

        timed.__name__ = op
        return timed

    @property
    def inner(self) -> Backend:
        return self._inner

    def __getattr__(self, name: str) -> Any:
        # name, capabilities, describe, session_lost, notice_time, round_store, ...
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)
