"""The subset of PromQL that deploy/grafana-rdzv-dashboard.json uses, evaluated over scraped
samples (for bench/dashboard_picture.py, where there is no Prometheus): `Capture` holds the
scrapes, `Promql` evaluates an expression at a time (see its docstring for what it simplifies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


# ------------------------------------------------------------------------------ samples


@dataclass
class Capture:
    """Scrapes of the exporter: times (s since the first scrape) and the samples of each."""

    times: list[float] = field(default_factory=list)
    scrapes: list[dict[str, dict[Labels, float]]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # what the script did, when
    now: float | None = None  # the dashboard's "now": the stop of the runs

    def add(self, t: float, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
        self.times.append(t)
        self.scrapes.append(samples)

    def dump(self, path: Path) -> None:
        data = {
            "times": self.times,
            "scrapes": [{name: [[dict(k), v] for k, v in series.items()] for name, series in s.items()}
                        for s in self.scrapes],
            "marks": self.marks,
            "now": self.now,
        }
        path.write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> Capture:
        data = json.loads(path.read_text())
        scrapes = [{name: {frozenset(k.items()): v for k, v in series} for name, series in s.items()}
                   for s in data["scrapes"]]
        return cls(data["times"], scrapes, [tuple(m) for m in data["marks"]], data["now"])


# ------------------------------------------------------------------------------ PromQL, the dashboard's subset


TOKEN = re.compile(r'\s*(?:(\d+(?:\.\d+)?[smhd]?)|([A-Za-z_:][A-Za-z0-9_:]*)|("(?:[^"\\]|\\.)*")|(=~|!=|!~|[(){}\[\],=>]))')
DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Promql:
    """The PromQL the dashboard uses, evaluated at one instant over a `Capture`.

    Instant selectors with `=`, `!=`, `=~`, `!~` matchers (a series is present at t if the
    latest scrape at or before t had it, as Prometheus' staleness markers make it); `sum`,
    `count`, `min`, `max` without `by`; `changes`, `increase` and `rate` over a range, from the
    scraped samples in the window, without Prometheus' extrapolation to the window's edges;
    `vector(N)`; `> N` as a filter; `or`. Anything else raises.
    """

    def __init__(self, capture: Capture, variables: dict[str, str]) -> None:
        self.capture = capture
        self.variables = variables

    def eval(self, expr: str, t: float) -> Vector:
        for name, value in self.variables.items():
            expr = expr.replace(f"${name}", value)
        self._tokens = [m.group(0).strip() for m in TOKEN.finditer(expr)]
        if "".join(self._tokens) != re.sub(r"\s+", "", expr):
            raise ValueError(f"cannot read {expr!r}")
        self._pos, self._t = 0, t
        out = self._or()
        if self._pos != len(self._tokens):
            raise ValueError(f"unexpected {self._tokens[self._pos]!r} in {expr!r}")
        return out

    # -- parser and evaluator in one pass
    def _peek(self) -> str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'}, got {token!r}")
        self._pos += 1
        return token

    def _or(self) -> Vector:
        left = self._compare()
        while self._peek() == "or":
            self._take()
            right = self._compare()
            left = {**left, **{k: v for k, v in right.items() if k not in left}}
        return left

    def _compare(self) -> Vector:
        vec = self._primary()
        if self._peek() == ">":
            self._take()
            bound = float(self._take())
            vec = {k: v for k, v in vec.items() if v > bound}
        return vec

    def _primary(self) -> Vector:
        token = self._take()
        if token in ("sum", "count", "min", "max"):
            self._take("(")
            inner = self._or()
            self._take(")")
            if not inner:
                return {}
            agg: dict[str, Callable[[list[float]], float]] = {"sum": sum, "count": len, "min": min, "max": max}
            return {frozenset(): float(agg[token](list(inner.values())))}
        if token == "vector":
            self._take("(")
            value = float(self._take())
            self._take(")")
            return {frozenset(): value}
        if token in ("changes", "increase", "rate"):
            self._take("(")
            name, match = self._selector()
            self._take("[")
            window = self._duration(self._take())
            self._take("]")
            self._take(")")
            return self._range(token, name, match, window)
        name, match = self._selector(token)
        return self._instant(name, match)

    def _selector(self, name: str | None = None) -> tuple[str, Callable[[Labels], bool]]:
        name = name or self._take()
        tests: list[Callable[[dict[str, str]], bool]] = []
        if self._peek() == "{":
            self._take()
            while self._peek() != "}":
                label, op, value = self._take(), self._take(), json.loads(self._take())
                tests.append(_matcher(label, op, value))
                if self._peek() == ",":
                    self._take()
            self._take("}")
        return name, lambda labels: all(test(dict(labels)) for test in tests)

    @staticmethod
    def _duration(text: str) -> float:
        return float(text[:-1]) * DURATION[text[-1]]

    def _at(self, t: float) -> int | None:
        """Index of the latest scrape at or before t."""
        found = None
        for i, when in enumerate(self.capture.times):
            if when > t:
                break
            found = i
        return found

    def _instant(self, name: str, match: Callable[[Labels], bool]) -> Vector:
        i = self._at(self._t)
        if i is None:
            return {}
        return {k: v for k, v in self.capture.scrapes[i].get(name, {}).items() if match(k)}

    def _range(self, func: str, name: str, match: Callable[[Labels], bool], window: float) -> Vector:
        series: dict[Labels, list[tuple[float, float]]] = {}
        for when, scrape in zip(self.capture.times, self.capture.scrapes, strict=True):
            if self._t - window < when <= self._t:
                for k, v in scrape.get(name, {}).items():
                    if match(k):
                        series.setdefault(k, []).append((when, v))
        out: Vector = {}
        for k, points in series.items():
            values = [v for _, v in points]
            if func == "changes":
                out[k] = float(sum(a != b for a, b in zip(values, values[1:], strict=False)))
            elif len(points) >= 2:
                # Counter resets: a drop restarts the count from 0.
                rise = sum(b - a if b >= a else b for a, b in zip(values, values[1:], strict=False))
                out[k] = rise if func == "increase" else rise / (points[-1][0] - points[0][0])
        return out


def _matcher(label: str, op: str, value: str) -> Callable[[dict[str, str]], bool]:
    if op == "=":
        return lambda labels: labels.get(label, "") == value
    if op == "!=":
        return lambda labels: labels.get(label, "") != value
    pattern = re.compile(value)
    if op == "=~":
        return lambda labels: pattern.fullmatch(labels.get(label, "")) is not None
    return lambda labels: pattern.fullmatch(labels.get(label, "")) is None


def legend(fmt: str | None, labels: Labels) -> str:
    as_dict = dict(labels)
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(as_dict.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: as_dict.get(m.group(1), ""), fmt)
