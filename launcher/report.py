"""What the launcher tells the user: one line per event on stderr, as text or as JSON."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO


class Reporter:
    """Writes the launcher's own messages; stdout is left to the workers."""

    def __init__(self, prog: str, fmt: str = "text", quiet: bool = False, stream: TextIO | None = None) -> None:
        self.prog = prog
        self.json = fmt == "json"
        self.quiet = quiet
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, message: str, level: str = "info", always: bool = False, **fields: Any) -> None:
        # --quiet silences progress and notices, never errors (nor `always` lines).
        if self.quiet and level != "error" and not always:
            return
        if self.json:
            record = {"ts": round(time.time(), 3), "level": level, "event": event, "message": message, **fields}
            line = json.dumps(record, default=str)
        elif level == "info":
            line = f"{self.prog}: {message}"
        else:
            line = f"{self.prog}: {level}: {message}"
        self.write_line(line)

    def write_line(self, line: str) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def info(self, event: str, message: str, **fields: Any) -> None:
        self.emit(event, message, "info", **fields)

    def warning(self, event: str, message: str, **fields: Any) -> None:
        self.emit(event, message, "warning", **fields)

    def error(self, event: str, message: str, **fields: Any) -> None:
        self.emit(event, message, "error", **fields)


class ReporterLogHandler(logging.Handler):
    """Routes torch's elastic agent logs (and rdzv's) through the Reporter (one line or one JSON object each)."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            level = {logging.DEBUG: "debug", logging.INFO: "info"}.get(record.levelno, record.levelname.lower())
            if self.reporter.json:
                event = "torch_log" if record.name.startswith("torch") else "rdzv_log"
                self.reporter.emit(event, message, level, always=True, logger=record.name)
            else:
                # Keep torch's own messages recognisable and never silenced by --quiet.
                self.reporter.write_line(f"[{record.levelname[0]} {record.name}] {message}")
        except Exception:
            self.handleError(record)


def _seconds(value: Any) -> str:
    return f"{max(0, round(float(value)))} s"


def format_progress(run_id: str, progress: Mapping[str, Any], age: float = 0.0) -> str:
    """`rendezvous job42 round 3: 3/4 nodes (min 2, max 4), last call ends in 12 s` from a handler's dict.

    `age` is how long ago the handler reported it, so a countdown stays true between reports.
    """
    head = f"rendezvous {progress.get('run_id', run_id)}"
    if progress.get("round") is not None:
        head += f" round {progress['round']}"
    parts = []
    joined, lo, hi = progress.get("joined"), progress.get("min_nodes"), progress.get("max_nodes")
    if joined is not None:
        count = len(joined) if isinstance(joined, (list, tuple, set, dict)) else joined
        parts.append(f"{count}/{hi} nodes" if hi is not None else f"{count} nodes")
    if lo is not None and hi is not None:
        parts.append(f"(min {lo}, max {hi})")
    text = " ".join(parts)
    remaining = progress.get("last_call_remaining")
    if remaining is not None:
        text += f", last call ends in {_seconds(float(remaining) - age)}"
    waiting_for = progress.get("waiting_for")
    if waiting_for:
        if isinstance(waiting_for, (list, tuple, set)):
            items = sorted(map(str, waiting_for))
            waiting_for = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
        text += f", waiting for {waiting_for}"
    return f"{head}: {text.lstrip(', ')}" if text else f"{head}: waiting"
