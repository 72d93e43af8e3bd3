"""bench/lifecycle.py's results: one phase of one run, the Markdown table, the legend."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from error_kinds import format_counts
from etcd_metrics import PerNode
from formation_report import fmt

PHASES = ("create handler", "next_rendezvous", "assign ranks", "exit barrier", "shutdown",
          "re-form after SIGKILL", "scale-up: form N", "scale-up: +1 joins")


@dataclass
class Phase:
    label: str  # backend
    n: int
    phase: str  # one of PHASES
    expected: int  # nodes that should finish it
    wall_s: float | None = None  # from the common release to the last node done
    done: int = 0
    cost: PerNode | None = None  # etcd's counters, per node of `expected` (None: not an etcd backend)
    store_ops: tuple[float, float] | None = None  # our c10d: TCPStore writes, reads per node
    notice_s: float | None = None  # re-form / scale-up: to the last survivor noticing
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    error: str | None = None  # the phase failed: why
    skipped: bool = False  # an earlier phase failed
    note: str = ""


def _activity(c: PerNode | None, v2: bool, nodes: int) -> tuple[str, str, str, str]:
    """puts, deletes | watch events per node | watchers/streams open after | leases granted, revoked, lapsed."""
    if c is None:
        return "–", "–", "–", "–"
    a, n = c.activity, max(nodes, 1)
    if v2:
        return (f"{a.get('v2_puts', 0):.0f}, {a.get('v2_deletes', 0):.0f}",
                f"– ({a.get('v2_watch_requests', 0) / n:.2f} watch requests)",
                f"{a.get('v2_watchers', 0):.0f} (v2)",
                f"TTL keys expired {a.get('v2_expires', 0):.0f}")
    return (f"{a.get('puts', 0):.0f}, {a.get('deletes', 0):.0f}",
            f"{a.get('watch_events', 0) / n:.2f}",
            f"{a.get('watchers', 0):.0f} / {a.get('watch_streams', 0):.0f}",
            f"{a.get('leases_granted', 0):.0f}, {a.get('leases_revoked', 0):.0f}, {a.get('leases_expired', 0):.0f}")


def _result(p: Phase) -> str:
    if p.skipped:
        return "skipped (an earlier phase failed)"
    if p.error is not None:
        return "FAILED: " + (p.error if len(p.error) <= 160 else p.error[:159] + "…")
    return "ok" + (f" ({p.note})" if p.note else "")


def table(rows: list[Phase], header: str) -> str:
    lines = [
        header,
        "",
        "| backend | N | phase | wall (s) | nodes done | raft commits per node | puts, deletes "
        "| RPCs per node (messages) | KB sent per node | KB received per node | watch events per node "
        "| watchers / streams open after | etcd DB growth (KB) | keys Δ, revisions Δ "
        "| leases granted, revoked, lapsed | errors seen | result |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in rows:
        c = p.cost
        v2 = "etcd-v2" in p.label
        puts, events, watchers, leases = _activity(c, v2, p.expected)
        commits = "–" if c is None else f"{c.commits:.2f}"
        if c is None and p.store_ops is not None:
            commits = f"{p.store_ops[0]:.2f} writes ({p.store_ops[1]:.2f} reads)"
        if c is None:
            rpcs = sent = received = growth = keys = "–"
        else:
            a = c.activity
            v2_calls = (a.get("v2_puts", 0) + a.get("v2_deletes", 0) + a.get("v2_reads", 0)
                        + a.get("v2_watch_requests", 0)) / max(p.expected, 1)
            rpcs = f"{c.rpcs:.2f} ({c.messages:.1f})" + (f" + {v2_calls:.2f} v2" if v2 else "")
            sent = f"{c.sent_kb:.1f}" + (" (v3 only)" if v2 else "")
            received = f"{c.received_kb:.1f}" + (" (v3 only)" if v2 else "")
            growth, keys = f"{c.db_growth_kb:.0f}", f"{c.keys:+.0f}, {c.revisions:+.0f}"
        wall = fmt(p.wall_s) + ("" if p.notice_s is None else f" ({fmt(p.notice_s)})")
        cells = [
            p.label, str(p.n), p.phase, "–" if p.skipped else wall,
            "–" if p.skipped else f"{p.done}/{p.expected}", commits, puts, rpcs, sent, received, events,
            watchers, growth, keys, leases, format_counts(p.errors, 4) or "none", _result(p),
        ]
        if p.skipped:
            cells[5:15] = ["–"] * 10
        lines.append("| " + " | ".join(x.replace("|", "/").replace("\n", " ") for x in cells) + " |")
    return "\n".join(lines)


LEGEND = """\
Each phase is released to every node at one instant (a multiprocessing event); wall: from that
instant to the last node done (re-form: from the SIGKILL; in parentheses, to the last survivor
noticing the loss by num_nodes_waiting(), or for torch's handlers told at the kill; scale-up
+1: from the newcomer's start, handler creation included, to the last of the N + 1 returning
from next_rendezvous(), in parentheses the last of the N noticing it). etcd's /metrics are read
just before each release and after the last node reported. Per node: divided by the nodes of the
phase. Puts: mvcc put calls; deletes: mvcc delete-range calls (a lapsed or revoked lease deletes
its keys, one call each); for etcd-v2, the v2 store's writes by action. RPCs: gRPC calls started
(messages: every request message, keep-alives and watch requests on open streams included);
etcd 3.4 counts its v2 HTTP API in no RPC or byte counter, so for etcd-v2 the v2 store's reads,
writes and watch requests are added ("+ x v2") and the bytes are those of its v3 calls only.
Watch events: events etcd sent to v3 watchers (etcd_debugging_mvcc_events_total); etcd 3.4 does
not count v2 watch events, only v2 watch requests. Watchers / streams: v3 watchers and watch
streams open at the end of the phase (gauges). Leases lapsed: etcd_debugging_server_lease_expired_total;
for v2, keys whose TTL expired. DB growth, keys and revisions: the whole database. c10d backends:
no etcd; our c10d shows the TCPStore operations its backend counts (rendezvous only, not the
round store's). Errors seen: by kind (warning: log records of the nodes; etcd: calls etcd
answered with an error code). A failed phase's later phases are skipped (handlers still shut
down, unmeasured)."""
