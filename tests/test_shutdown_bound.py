"""rdzv-launch ends the rendezvous of a finished job within a bound, saying so when it cannot."""

from __future__ import annotations

import threading

import pytest

from launcher import agent


class Lines:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, str]] = []

    def warning(self, event: str, message: str) -> None:
        self.warnings.append((event, message))


def test_a_shutdown_that_hangs_is_given_up_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "SHUTDOWN_WAIT", 0.2)
    release = threading.Event()
    lines = Lines()
    try:
        agent.end_rendezvous(lambda: release.wait(30), lines)
    finally:
        release.set()
    assert lines.warnings == [("shutdown_failed", "could not close the rendezvous within 0.2 s; exiting anyway")]


def test_a_shutdown_that_fails_is_one_line_and_one_that_ends_is_none() -> None:
    lines = Lines()

    def refused() -> None:
        raise ConnectionError("etcd 127.0.0.1:1 refused")

    agent.end_rendezvous(refused, lines)
    agent.end_rendezvous(lambda: None, lines)
    assert lines.warnings == [("shutdown_failed", "could not close the rendezvous: ConnectionError: etcd 127.0.0.1:1 refused")]
