"""The launcher's exit barrier over a real TCPStore: completes, gives up on a closed run, times out;
and --exit-barrier-timeout with two real rdzv-launch nodes on etcd."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from launcher_helpers import launchers, write_script
from torch.distributed import TCPStore

from launcher import exit_barrier
from launcher.exit_barrier import wait_for_peers
from launcher.report import Reporter


class RunState:
    """Stands in for the rendezvous handler: only is_closed() is asked."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


@pytest.fixture
def store() -> TCPStore:
    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    yield server
    del server


def _reporter() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter("rdzv-launch", fmt="json", stream=out), out


def _events(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_same_keys_as_torch() -> None:
    """Nodes started by torchrun (torch's barrier) and by rdzv-launch meet in one barrier."""
    from torch.distributed.elastic.agent.server import api
    from torch.distributed.elastic.utils import store as store_util

    assert exit_barrier.TERMINAL_STATE_PREFIX == api._TERMINAL_STATE_SYNC_ID
    assert exit_barrier.NUM_MEMBERS_KEY == api._TERMINAL_STATE_SYNC_ID + store_util._NUM_MEMBERS
    assert exit_barrier.LAST_MEMBER_KEY == api._TERMINAL_STATE_SYNC_ID + store_util._LAST_MEMBER_CHECKIN


def test_all_nodes_check_in(store: TCPStore) -> None:
    reporter, out = _reporter()
    results: list[bool] = []
    peers = [
        threading.Thread(target=lambda: results.append(wait_for_peers(store, 3, RunState(), 30, reporter, 5)))
        for _ in range(3)
    ]
    for t in peers:
        t.start()
    for t in peers:
        t.join(30)
    assert results == [True, True, True]
    assert not any(e["level"] == "warning" for e in _events(out))


def test_closed_run_without_the_last_node_ends_the_wait(store: TCPStore) -> None:
    reporter, out = _reporter()
    state = RunState()
    threading.Timer(1.5, lambda: setattr(state, "closed", True)).start()
    assert wait_for_peers(store, 2, state, 60, reporter, 0.5) is False
    events = _events(out)
    # It said what it waited for before giving up, then why it gave up.
    assert events[0]["event"] == "exit_barrier" and events[0]["done"] == 1 and events[0]["nodes"] == 2
    assert events[-1]["event"] == "exit_barrier_abandoned"
    assert "1 of 2 nodes had finished" in events[-1]["message"]


def test_closed_run_after_completion_is_success(store: TCPStore) -> None:
    """The last node closes the run right after checking in: that is a completed barrier."""
    reporter, _ = _reporter()
    store.add(exit_barrier.NUM_MEMBERS_KEY, 1)
    store.set(exit_barrier.LAST_MEMBER_KEY, "<val_ignored>")
    assert wait_for_peers(store, 3, RunState(closed=True), 10, reporter, 5) is True


def test_timeout_is_bounded_and_said(store: TCPStore) -> None:
    reporter, out = _reporter()
    assert wait_for_peers(store, 2, RunState(), 1.5, reporter, 5) is False
    assert _events(out)[-1]["event"] == "exit_barrier_timeout"
    assert "1 of 2 nodes finished within 1.5 s" in _events(out)[-1]["message"]


# One worker per node: the node tagged "fast" finishes at once; the other sleeps until
# <out>/stop exists (a peer whose workers run long).
UNEVEN = """
import os, sys, time
out, tag = sys.argv[1], sys.argv[2]
if tag != "fast":
    while not os.path.exists(os.path.join(out, "stop")):
        time.sleep(0.05)
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_exit_barrier_timeout_option_ends_the_wait(etcd35, tmp_path: Path) -> None:
    """Two rdzv-launch nodes: the one whose worker finished gives up the barrier after
    --exit-barrier-timeout, says so in one line and exits 0 (its workers succeeded)."""
    worker = write_script(tmp_path, "uneven.py", UNEVEN)
    common = ["--nnodes=2", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}",
              f"--rdzv-id=barrier-{uuid.uuid4().hex[:8]}", "--rdzv-conf=lease_ttl=3,join_timeout=60",
              "--local-addr=127.0.0.1"]
    with launchers(tmp_path) as start:
        fast = start([*common, "--exit-barrier-timeout", "3", str(worker), str(tmp_path), "fast"])
        slow = start([*common, str(worker), str(tmp_path), "slow"])

        def logs() -> str:
            return f"=== fast\n{fast.describe()}\n=== slow\n{slow.describe()}"

        try:
            assert fast.wait(120) == 0, logs()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the finished node did not leave the barrier\n{logs()}") from None
        lines = [line for line in fast.stderr.splitlines() if "not waiting longer" in line]
        assert lines == ["rdzv-launch: warning: 1 of 2 nodes finished within 3 s; not waiting longer"], logs()
        (tmp_path / "stop").touch()
