"""bench/formation.py's results: one run's figures, the median of repeats, the markdown table."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from error_kinds import format_counts
from etcd_metrics import PerNode


@dataclass
class Result:
    label: str
    n: int
    create_s: float | None
    form_s: float | None
    writes_per_node: float | None  # raft commits per node (etcd), TCPStore writes (our c10d)
    error: str | None
    reads_per_node: float | None = None
    cpu_s: float | None = None  # CPU seconds of the pool processes in the window, summed
    reform_s: float | None = None  # from the SIGKILL to the last survivor's return
    notice_s: float | None = None  # from the SIGKILL to the last survivor seeing the loss
    reform_error: str | None = None  # None: re-formed, or not tried (reform_tried)
    reform_tried: bool = False
    notice: str = "poll"  # how survivors learnt of the loss: poll (num_nodes_waiting) | told
    form_cost: PerNode | None = None  # etcd, per node of N
    reform_cost: PerNode | None = None  # etcd, per survivor (N - 1)
    probes: tuple[int, int] | None = None  # first writes to the round's store: ok, nodes
    probes_again: tuple[int, int] | None = None  # the same after the re-formation
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count, all phases
    runs: int = 1


def median(results: list[Result]) -> Result:
    """Medians over the runs that formed (a failure is the result when none did); errors summed
    over every run, probe counts from the worst run."""
    ok = [r for r in results if r.error is None]
    if not ok:
        last = results[-1]
        last.errors = sum((r.errors for r in results), Counter())
        last.runs = len(results)
        return last

    def med(get: Callable[[Result], float | None]) -> float | None:
        values = [v for v in map(get, ok) if v is not None]
        return statistics.median(values) if values else None

    reformed = [r for r in ok if r.reform_s is not None]
    failed_reform = next((r.reform_error for r in ok if r.reform_error), None)
    return Result(
        ok[0].label, ok[0].n,
        create_s=med(lambda r: r.create_s),
        form_s=med(lambda r: r.form_s),
        writes_per_node=med(lambda r: r.writes_per_node),
        error=None,
        reads_per_node=med(lambda r: r.reads_per_node),
        cpu_s=med(lambda r: r.cpu_s),
        reform_s=statistics.median(r.reform_s for r in reformed) if reformed else None,  # type: ignore[misc]
        notice_s=med(lambda r: r.notice_s),
        reform_error=failed_reform,
        reform_tried=any(r.reform_tried for r in ok),
        notice=ok[0].notice,
        form_cost=PerNode.median([r.form_cost for r in ok if r.form_cost]),
        reform_cost=PerNode.median([r.reform_cost for r in ok if r.reform_cost]),
        probes=min((r.probes for r in ok if r.probes), default=None),
        probes_again=min((r.probes_again for r in ok if r.probes_again), default=None),
        errors=sum((r.errors for r in results), Counter()),
        runs=len(results),
    )


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pair(form: PerNode | None, reform: PerNode | None, get: Callable[[PerNode], float], digits: int) -> str:
    first = "–" if form is None else f"{get(form):.{digits}f}"
    if reform is None:
        return first
    return f"{first} / {get(reform):.{digits}f}"


def _probes(r: Result) -> str:
    cells = [f"{p[0]}/{p[1]}" for p in (r.probes, r.probes_again) if p is not None]
    return " / ".join(cells) or "–"


def _reform_cell(r: Result) -> str:
    if r.reform_s is None:
        return "–"
    if r.notice == "told":
        return f"{fmt(r.reform_s)} (told at the kill)"
    return fmt(r.reform_s) + ("" if r.notice_s is None else f" ({fmt(r.notice_s)})")


def _result_cell(r: Result) -> str:
    if r.error is not None:
        return "FAILED: " + _short(r.error)
    if not r.reform_tried:
        return "formed"
    if r.reform_error is not None:
        return "formed; re-formation FAILED: " + _short(r.reform_error)
    return f"formed, re-formed with {r.n - 1}"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(rows: list[Result], header: str) -> str:
    lines = [
        header,
        "",
        "| backend | N | handler creation (s) | time to form (s) | re-form after SIGKILL (s) (all noticed) "
        "| raft commits per node | etcd RPCs per node (messages) | KB sent per node | KB received per node "
        "| etcd DB growth (KB) | keys Δ, revisions Δ | first store write ok | errors seen | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        f, g = r.form_cost, r.reform_cost
        commits = _pair(f, g, lambda c: c.commits, 2)
        if f is None and r.writes_per_node is not None:  # our c10d: the TCPStore operations it counted
            commits = f"{fmt(r.writes_per_node)} writes" + (
                "" if r.reads_per_node is None else f" ({fmt(r.reads_per_node)} reads)")
        rpcs = "–" if f is None else (
            f"{f.rpcs:.2f} ({f.messages:.1f})" + ("" if g is None else f" / {g.rpcs:.2f} ({g.messages:.1f})"))
        keys = "–" if f is None else (
            f"{f.keys:+.0f}, {f.revisions:+.0f}" + ("" if g is None else f" / {g.keys:+.0f}, {g.revisions:+.0f}"))
        cells = [
            r.label, str(r.n), fmt(r.create_s), fmt(r.form_s), _reform_cell(r), commits, rpcs,
            _pair(f, g, lambda c: c.sent_kb, 1), _pair(f, g, lambda c: c.received_kb, 1),
            _pair(f, g, lambda c: c.db_growth_kb, 0), keys, _probes(r),
            format_counts(r.errors, 4) or "none", _result_cell(r),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


LEGEND = """\
Cells with two figures are formation / re-formation. Formation: from a common start instant
to the last node's return from next_rendezvous(); etcd figures from before handler creation
to after formation, per node of N. Re-formation: one node, alone in its process, is SIGKILLed
after formation; time from the kill to the last survivor's return (in parentheses: to the
last survivor noticing the loss, polling num_nodes_waiting(); torch's handlers never count a
lost member there, so their survivors are told at the kill); etcd figures from just before the kill to after
re-formation, per survivor. RPCs: gRPC calls started (unary requests and streams opened);
messages: every request message received, keep-alives and watch requests on open streams
included. DB growth and keys/revisions: the whole database. First store write ok: nodes whose
write of probe/<rank> to the round's store succeeded, of those that should have written.
Errors seen: by kind and phase, over all runs (warning: log records of the nodes; etcd: calls
etcd answered with an error code; the killed node's keep-alive stream ends as Unavailable)."""
