"""bench/lifecycle.py's pieces that need no etcd: etcd's activity counters, the phase table."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from etcd_metrics import Cost, parse  # noqa: E402 - bench/, found through the path above
from lifecycle_report import Phase, table  # noqa: E402

METRICS = """\
# TYPE etcd_mvcc_put_total counter
etcd_mvcc_put_total {puts}
# TYPE etcd_mvcc_delete_total counter
etcd_mvcc_delete_total 2
# TYPE etcd_debugging_mvcc_events_total counter
etcd_debugging_mvcc_events_total {events}
# TYPE etcd_debugging_mvcc_watch_stream_total gauge
etcd_debugging_mvcc_watch_stream_total {streams}
# TYPE etcd_debugging_server_lease_expired_total counter
etcd_debugging_server_lease_expired_total 1
# TYPE etcd_debugging_store_writes_total counter
etcd_debugging_store_writes_total{{action="set"}} 4
etcd_debugging_store_writes_total{{action="compareAndSwap"}} 3
etcd_debugging_store_writes_total{{action="delete"}} {v2_deletes}
# TYPE etcd_server_proposals_committed_total gauge
etcd_server_proposals_committed_total {commits}
"""


def snapshot(puts: int, events: int, streams: int, v2_deletes: int, commits: int):  # noqa: ANN201
    return parse(METRICS.format(puts=puts, events=events, streams=streams, v2_deletes=v2_deletes, commits=commits))


def test_activity_counters_are_deltas_and_gauges_are_values_after() -> None:
    cost = Cost.between(snapshot(10, 100, 5, 1, 50), snapshot(25, 160, 2, 3, 80))
    a = cost.activity
    assert (a["puts"], a["deletes"], a["watch_events"], a["leases_expired"]) == (15, 0, 60, 0)
    assert a["watch_streams"] == 2  # a gauge: as it stands after the phase
    assert (a["v2_puts"], a["v2_deletes"]) == (0, 2)
    assert cost.commits == 30
    assert cost.per_node(10).activity == a  # whole database, not divided


def test_table_rows_for_a_failed_and_a_skipped_phase() -> None:
    cost = Cost.between(snapshot(0, 0, 0, 0, 0), snapshot(32, 64, 2, 0, 48)).per_node(16)
    ok = Phase("rdzv etcd", 16, "next_rendezvous", 16, wall_s=0.25, done=16, cost=cost)
    failed = Phase("rdzv etcd", 16, "assign ranks", 16, wall_s=None, done=3, errors=Counter({"timed out": 13}),
                   error="13 node(s) still waiting at the timeout")
    skipped = Phase("rdzv etcd", 16, "exit barrier", 16, skipped=True)
    text = table([ok, failed, skipped], "header")
    rows = text.splitlines()[4:]
    assert len(rows) == 3 and all(r.count("|") == rows[0].count("|") for r in rows)
    assert "| 3.00 |" in rows[0] and "| 32, 0 |" in rows[0] and "| 4.00 |" in rows[0]  # commits/node, puts, events/node
    assert "FAILED: 13 node(s) still waiting" in rows[1] and "timed out ×13" in rows[1]
    assert rows[2].endswith("| skipped (an earlier phase failed) |")
