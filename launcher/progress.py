"""A RendezvousHandler wrapper that reports waiting progress and times each formation.

It also tells the launcher's metrics (launcher.metrics.recorder) when a rendezvous starts and
completes, and what each `num_nodes_waiting()` answered (a positive answer is trouble: the
agent restarts its workers for a membership change).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo

from launcher.metrics.recorder import MEMBERSHIP, NULL_RECORDER, Recorder
from launcher.report import Reporter, format_progress

RESERVED = {"ts", "level", "event", "message", "always", "run_id", "waited_s"}


class ReportingHandler(RendezvousHandler):
    """Delegates every handler method to `inner`; `next_rendezvous` is timed and reported.

    Handlers with `set_progress_callback(cb)` get `cb(progress: dict)` registered; for the others a
    timer thread prints a generic waiting line. Either way at most one line per `interval` seconds.
    """

    def __init__(
        self,
        inner: RendezvousHandler,
        reporter: Reporter,
        interval: float,
        min_nodes: int,
        max_nodes: int,
        where: str,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self._inner = inner
        self._recorder = recorder
        counts = getattr(inner, "group_counts", None)  # ours: newcomers, spares, lost
        self._group_counts = counts if callable(counts) else None
        self._reporter = reporter
        self._interval = interval
        self._min_nodes = min_nodes
        self._max_nodes = max_nodes
        self._where = where
        self._lock = threading.Lock()
        self._progress: dict[str, Any] | None = None
        self._progress_at = 0.0
        self._rounds = 0
        register = getattr(inner, "set_progress_callback", None)
        if callable(register):
            register(self._on_progress)

    # ------------------------------------------------------------ progress

    def _on_progress(self, progress: Mapping[str, Any]) -> None:
        with self._lock:
            self._progress = dict(progress)
            self._progress_at = time.monotonic()

    def _report_waiting(self, started: float) -> None:
        run_id = self._inner.get_run_id()
        with self._lock:
            progress, at = self._progress, self._progress_at
        waited = time.monotonic() - started
        if progress is not None:
            age = time.monotonic() - at
            # A handler's keys must not collide with the record's own.
            fields = {k: v for k, v in progress.items() if k not in RESERVED}
            self._reporter.info(
                "rendezvous_progress",
                format_progress(run_id, progress, age),
                run_id=progress.get("run_id", run_id),
                waited_s=round(waited, 1),
                **fields,
            )
        else:
            span = f"{self._min_nodes}" if self._min_nodes == self._max_nodes else f"{self._min_nodes} to {self._max_nodes}"
            self._reporter.info(
                "rendezvous_waiting",
                f"waiting for rendezvous {run_id} ({span} nodes, {self._where}) ({round(waited)} s)",
                run_id=run_id,
                waited_s=round(waited, 1),
                min_nodes=self._min_nodes,
                max_nodes=self._max_nodes,
            )

    def _ticker(self, started: float, stop: threading.Event) -> None:
        last = started
        tick = min(0.5, self._interval)
        while not stop.wait(tick):
            if time.monotonic() - last >= self._interval:
                last = time.monotonic()
                self._report_waiting(started)

    # ------------------------------------------------------------ the handler interface

    def next_rendezvous(self) -> RendezvousInfo:
        started = time.monotonic()
        self._recorder.rendezvous_started()
        with self._lock:
            self._progress = None
        stop = threading.Event()
        ticker = threading.Thread(target=self._ticker, args=(started, stop), name="rdzv-progress", daemon=True)
        ticker.start()
        try:
            info = self._inner.next_rendezvous()
        finally:
            stop.set()
            ticker.join()
        self._rounds += 1
        took = time.monotonic() - started
        with self._lock:
            progress = self._progress or {}
        run_id = self._inner.get_run_id()
        # A round that formed at once reported no progress: ask the handler (ours know it).
        round_ = progress.get("round", getattr(self._inner, "round", None))
        self._recorder.rendezvous_completed(round_, info.world_size, info.rank, took)
        head = f"rendezvous {run_id}" + (f" round {round_}" if round_ is not None else "")
        self._reporter.info(
            "rendezvous_complete",
            f"{head} complete: node rank {info.rank} of {info.world_size} nodes, took {took:.1f} s",
            run_id=run_id,
            round=round_,
            node_rank=info.rank,
            nodes=info.world_size,
            took_s=round(took, 3),
            formation=self._rounds,
        )
        return info

    def get_backend(self) -> str:
        return self._inner.get_backend()

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        waiting = self._inner.num_nodes_waiting()
        counts = self._group_counts
        self._recorder.nodes_waiting(waiting, counts() if counts is not None else None)
        if waiting > 0:
            self._recorder.trouble(MEMBERSHIP)
        return waiting

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def shutdown(self) -> bool:
        return self._inner.shutdown()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the interface (backend-specific extras) still reaches the real handler.
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)
