"""What the launcher says while the group forms: the handler wrapper and the line formats."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from torch.distributed import HashStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from launcher.progress import ReportingHandler
from launcher.report import Reporter, format_progress

pytestmark = pytest.mark.timeout(30)


class FakeHandler(RendezvousHandler):
    """Waits `wait` seconds in next_rendezvous, feeding `progress` dicts to a registered callback."""

    def __init__(self, wait: float = 0.0, progress: list[dict[str, Any]] | None = None) -> None:
        self.wait = wait
        self.progress = progress or []
        self.callback: Callable[[dict[str, Any]], None] | None = None
        self.calls: list[str] = []

    def get_backend(self) -> str:
        self.calls.append("get_backend")
        return "fake"

    @property
    def use_agent_store(self) -> bool:
        self.calls.append("use_agent_store")
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        self.calls.append("next_rendezvous")
        steps = max(1, len(self.progress))
        for p in self.progress:
            if self.callback:
                self.callback(p)
            time.sleep(self.wait / steps)
        if not self.progress:
            time.sleep(self.wait)
        return RendezvousInfo(HashStore(), 1, 3, RendezvousStoreInfo("h", 1))

    def is_closed(self) -> bool:
        self.calls.append("is_closed")
        return False

    def set_closed(self) -> None:
        self.calls.append("set_closed")

    def num_nodes_waiting(self) -> int:
        self.calls.append("num_nodes_waiting")
        return 2

    def get_run_id(self) -> str:
        return "job42"

    def shutdown(self) -> bool:
        self.calls.append("shutdown")
        return True

    def extra(self) -> str:
        return "extra"


class CallbackHandler(FakeHandler):
    def set_progress_callback(self, cb: Callable[[dict[str, Any]], None]) -> None:
        self.callback = cb


def _wrap(inner: RendezvousHandler, interval: float = 0.1, fmt: str = "text") -> tuple[ReportingHandler, io.StringIO]:
    out = io.StringIO()
    return ReportingHandler(inner, Reporter("rdzv-launch", fmt, stream=out), interval, 2, 4, "fake at e:1"), out


def test_every_handler_method_is_delegated() -> None:
    inner = FakeHandler()
    wrapper, _ = _wrap(inner)
    assert isinstance(wrapper, RendezvousHandler)
    assert wrapper.get_backend() == "fake" and wrapper.use_agent_store is True
    assert wrapper.is_closed() is False and wrapper.num_nodes_waiting() == 2
    wrapper.set_closed()
    assert wrapper.shutdown() is True and wrapper.get_run_id() == "job42"
    assert wrapper.extra() == "extra", "backend-specific extras stay reachable"
    info = wrapper.next_rendezvous()
    assert (info.rank, info.world_size) == (1, 3)
    expected = {"get_backend", "use_agent_store", "is_closed", "num_nodes_waiting", "set_closed", "shutdown", "next_rendezvous"}
    assert set(inner.calls) == expected
    # Nothing of the interface is left to the (abstract) base class.
    members = {n for n in vars(RendezvousHandler) if not n.startswith("_")}
    assert members <= set(vars(ReportingHandler))


def test_progress_from_a_handler_callback() -> None:
    progress = [
        {"run_id": "job42", "round": 3, "joined": 2, "min_nodes": 2, "max_nodes": 4, "last_call_remaining": 12.4, "waiting_for": "nodes"},
        {"run_id": "job42", "round": 3, "joined": 3, "min_nodes": 2, "max_nodes": 4, "last_call_remaining": 12.0},
    ]
    wrapper, out = _wrap(CallbackHandler(wait=0.6, progress=progress), interval=0.2)
    wrapper.next_rendezvous()
    lines = out.getvalue().splitlines()
    assert any(line.startswith("rdzv-launch: rendezvous job42 round 3: ") and "/4 nodes (min 2, max 4), last call ends in 1" in line for line in lines), lines
    assert lines[-1].startswith("rdzv-launch: rendezvous job42 round 3 complete: node rank 1 of 3 nodes, took 0.")
    assert len(lines) <= 1 + 0.6 / 0.2 + 1, "at most one progress line per interval"


def test_generic_waiting_line_without_a_callback() -> None:
    wrapper, out = _wrap(FakeHandler(wait=0.35), interval=0.1)
    wrapper.next_rendezvous()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("rdzv-launch: waiting for rendezvous job42 (2 to 4 nodes, fake at e:1) (0 s)")
    assert lines[-1].startswith("rdzv-launch: rendezvous job42 complete: node rank 1 of 3 nodes")


def test_fast_formation_prints_one_line() -> None:
    wrapper, out = _wrap(FakeHandler(), interval=5)
    wrapper.next_rendezvous()
    assert len(out.getvalue().splitlines()) == 1


def test_json_lines() -> None:
    wrapper, out = _wrap(CallbackHandler(wait=0.3, progress=[{"round": 1, "joined": 1, "max_nodes": 4}]), interval=0.1, fmt="json")
    wrapper.next_rendezvous()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[0]["event"] == "rendezvous_progress" and events[0]["joined"] == 1
    assert events[-1]["event"] == "rendezvous_complete"
    assert (events[-1]["round"], events[-1]["node_rank"], events[-1]["nodes"]) == (1, 1, 3)


def test_format_progress() -> None:
    p = {"round": 3, "joined": 3, "min_nodes": 2, "max_nodes": 4, "last_call_remaining": 12.2}
    assert format_progress("job42", p) == "rendezvous job42 round 3: 3/4 nodes (min 2, max 4), last call ends in 12 s"
    assert format_progress("j", {**p, "last_call_remaining": 12.2}, age=5).endswith("last call ends in 7 s")
    assert format_progress("j", {"waiting_for": ["n1", "n2", "n3", "n4"]}) == "rendezvous j: waiting for n1, n2, n3 and 1 more"
    assert format_progress("j", {}) == "rendezvous j: waiting"


def test_quiet_keeps_errors_only() -> None:
    out = io.StringIO()
    reporter = Reporter("p", quiet=True, stream=out)
    reporter.info("a", "info")
    reporter.warning("b", "warn")
    reporter.error("c", "bad")
    assert out.getvalue() == "p: error: bad\n"


def test_handler_warnings_stay_json_lines() -> None:
    """rdzv's own warnings (lease lapsed, heartbeat failed) go through the reporter: with
    --log-format json every stderr line stays one JSON object."""
    import logging

    from launcher.agent import prepare_logging

    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "rdzv")]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    try:
        prepare_logging(Reporter("rdzv-launch", fmt="json", stream=out))
        logging.getLogger("rdzv.backends.example").warning("rendezvous %s: lease lapsed", "job42")
        logging.getLogger("rdzv").info("not shown: below the default WARNING level")
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.propagate = propagate
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "rdzv_log" and record["level"] == "warning"
    assert record["message"] == "rendezvous job42: lease lapsed" and record["logger"] == "rdzv.backends.example"
