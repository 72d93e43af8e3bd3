"""Errors and warnings seen by simulated nodes, counted by kind.

A kind is a short name for the same failure across thousands of nodes: known etcd and gRPC
conditions by name (`too many requests`, `lease not found`, ...), anything else as its
exception type and message with numbers, ids and quoted names blanked out.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections import Counter

# (pattern in the lower-cased text, kind), first match wins
_KNOWN: tuple[tuple[str, str], ...] = (
    ("still waiting at the timeout", "still waiting at the timeout"),
    ("too many requests", "too many requests"),
    ("lease not found", "lease not found"),
    ("resource_exhausted", "resource exhausted"),
    ("resource exhausted", "resource exhausted"),
    ("nospace", "no space"),
    ("no space", "no space"),
    ("leader changed", "leader changed"),
    ("deadline", "deadline exceeded"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("unavailable", "unavailable"),
)
_BLANKS = (
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(r"\b[0-9a-f]{8,}\b"), "#"),
    (re.compile(r"\d+(\.\d+)?"), "#"),
)


def kind_of(text: str) -> str:
    """`Type: message` (or a bare message) -> the kind it counts under."""
    lower = text.lower()
    for pattern, kind in _KNOWN:
        if pattern in lower:
            return kind
    for regex, blank in _BLANKS:
        text = regex.sub(blank, text)
    return text[:80]


def counted(texts: list[str], prefix: str = "") -> Counter[str]:
    return Counter(prefix + kind_of(t) for t in texts)


def typical(texts: list[str]) -> str:
    """The first text of the most frequent kind (an exception over 'N still waiting')."""
    kinds = Counter(map(kind_of, texts))
    top = max(kinds, key=lambda k: (k != "still waiting at the timeout", kinds[k]))
    return next(t for t in texts if kind_of(t) == top)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300] or '(no message)'}"


def format_counts(counts: Counter[str], limit: int = 6) -> str:
    """`kind ×count; ...`, most frequent first; '' when there are none."""
    if not counts:
        return ""
    items = counts.most_common()
    text = "; ".join(f"{kind} ×{count}" for kind, count in items[:limit])
    return text + (f"; {len(items) - limit} more kinds" if len(items) > limit else "")


class WarningCounter(logging.Handler):
    """Counts the WARNING-and-above records of a process by kind, printing the first of each
    kind to stderr (thousands of nodes would otherwise print the same line thousands of times)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._counts: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is still a warning
            text = str(record.msg)
        kind = kind_of(text)
        with self._lock2:
            self._counts[kind] += 1
            first = kind not in self._seen
            self._seen.add(kind)
        if first:
            print(f"[{record.levelname.lower()} from a simulated node, first of its kind] {text[:300]}",
                  file=sys.stderr, flush=True)

    def take(self) -> Counter[str]:
        """The counts since the last take."""
        with self._lock2:
            counts, self._counts = self._counts, Counter()
        return counts
