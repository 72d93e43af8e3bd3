"""Helpers for rendezvous tests: nodes as threads in this process, or as killable processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from waiting import wait_until

from rdzv import create_handler

ROOT = Path(__file__).resolve().parent.parent

# Short timings keep the suite fast; the algorithm does not depend on their size.
FAST_CONF = {"lease_ttl": "2", "last_call_timeout": "1", "join_timeout": "30", "read_timeout": "5"}


def new_run_id(tag: str = "run") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"




class NodeGroup:
    """Handlers created in this process, each acting as a separate node; all shut down at exit."""

    def __init__(self, backend: str, endpoint: str, run_id: str, **conf: str) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.run_id = run_id
        self.conf = {**FAST_CONF, **conf}
        self.handlers: list[RendezvousHandler] = []
        self.pool = ThreadPoolExecutor(max_workers=32)

    def params(self, min_nodes: int, max_nodes: int, **extra: str) -> RendezvousParameters:
        local_addr = extra.pop("local_addr", None)
        return RendezvousParameters(
            self.backend,
            self.endpoint,
            self.run_id,
            min_nodes,
            max_nodes,
            local_addr=local_addr,
            **{**self.conf, **extra},
        )

    def node(self, min_nodes: int, max_nodes: int, **extra: str) -> RendezvousHandler:
        handler = create_handler(self.params(min_nodes, max_nodes, **extra))
        self.handlers.append(handler)
        return handler

    def join(self, handler: RendezvousHandler) -> Future:
        return self.pool.submit(handler.next_rendezvous)

    def join_all(self, handlers: list[RendezvousHandler], timeout: float = 60) -> list:
        futures = [self.join(h) for h in handlers]
        return [f.result(timeout=timeout) for f in futures]

    def shutdown(self) -> None:
        threads = [threading.Thread(target=_quiet_shutdown, args=(h,)) for h in self.handlers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _quiet_shutdown(handler: RendezvousHandler) -> None:
    with contextlib.suppress(Exception):  # cleanup after a failed test must not mask it
        handler.shutdown()


@contextmanager
def node_group(backend: str, endpoint: str, run_id: str | None = None, **conf: str) -> Iterator[NodeGroup]:
    group = NodeGroup(backend, endpoint, run_id or new_run_id(), **conf)
    try:
        yield group
    finally:
        group.shutdown()


class NodeProcess:
    """A node in its own process (tests/node_process.py), so it can be SIGKILLed."""

    def __init__(self, backend: str, endpoint: str, run_id: str, min_nodes: int, max_nodes: int, **conf: str) -> None:
        args = [
            sys.executable, str(ROOT / "tests" / "node_process.py"),
            backend, endpoint, run_id, str(min_nodes), str(max_nodes),
            json.dumps({**FAST_CONF, **conf}),
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        )
        self.rounds: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.rounds.append(json.loads(line))

    def wait_rounds(self, count: int, timeout: float = 60) -> dict:
        wait_until(lambda: len(self.rounds) >= count or self.proc.poll() is not None, timeout,
                   f"node process to report round #{count}")
        if len(self.rounds) < count:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"node process exited {self.proc.returncode}: {err[-2000:]}")
        return self.rounds[count - 1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
