"""The suite's one way to wait for an event: poll a predicate until it holds or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    on_fail: Callable[[], str] | None = None,
    step: float = 0.05,
) -> Any:
    """The predicate's first truthy value; AssertionError naming `what` (and `on_fail()`, e.g.
    the processes' logs) if none came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{on_fail()}" if on_fail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(step)
