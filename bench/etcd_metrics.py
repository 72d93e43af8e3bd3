"""etcd's own counters, read from its /metrics, for what one phase of a benchmark cost etcd.

    before = scrape(url); ...; cost = Cost.between(before, scrape(url))
    cost.per_node(n)   # the per-node figures the formation table shows

Counters (monotonic): raft proposals committed, gRPC calls started (unary requests and streams
opened), gRPC messages received (every keep-alive and watch request on an open stream counts),
bytes etcd sent to and received from clients, and calls that ended with a code other than OK
(by code; Canceled, the normal end of a stream a client closes, is left out). Gauges: the
database file's size and the part of it in use, the number of keys, the current revision.

`activity` (bench/lifecycle.py): what the requests did, as etcd 3.4 counts it. v3 (mvcc): puts,
delete-range calls (a lease's expiry or revocation deletes its keys one call each), txns,
ranges, watch events sent to watchers; the lease counters (granted, revoked, renewed, expired:
the leases that lapsed). v2 store: writes split into v2_puts and v2_deletes by action, reads,
watch requests, expired keys (v2's lapsed TTLs). Gauges read as they stand: watch streams and
watchers open (v3), v2 watchers. Cost.activity holds the counters' increments and the gauges'
values after the phase.
"""

from __future__ import annotations

import statistics
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, fields

from prometheus_client.parser import text_string_to_metric_families

# sample name -> attribute of Snapshot (a sample present more than once, by label, is summed)
_SUMMED = {
    "etcd_server_proposals_committed_total": "commits",
    "grpc_server_started_total": "rpcs",
    "grpc_server_msg_received_total": "messages",
    "etcd_network_client_grpc_sent_bytes_total": "sent",
    "etcd_network_client_grpc_received_bytes_total": "received",
    "etcd_mvcc_db_total_size_in_bytes": "db_size",
    "etcd_mvcc_db_total_size_in_use_in_bytes": "db_in_use",
    "etcd_debugging_mvcc_keys_total": "keys",
    "etcd_debugging_mvcc_current_revision": "revision",
}
# etcd 3.4 also has the older name of the database size; newer ones may drop it.
_FALLBACK = {"etcd_debugging_mvcc_db_total_size_in_bytes": "db_size"}
_NOT_ERRORS = {"OK", "Canceled"}
_ACTIVITY = {
    "etcd_mvcc_put_total": "puts",
    "etcd_mvcc_delete_total": "deletes",
    "etcd_mvcc_txn_total": "txns",
    "etcd_mvcc_range_total": "ranges",
    "etcd_debugging_mvcc_events_total": "watch_events",
    "etcd_debugging_lease_granted_total": "leases_granted",
    "etcd_debugging_lease_revoked_total": "leases_revoked",
    "etcd_debugging_lease_renewed_total": "leases_renewed",
    "etcd_debugging_server_lease_expired_total": "leases_expired",
    "etcd_debugging_store_reads_total": "v2_reads",
    "etcd_debugging_store_watch_requests_total": "v2_watch_requests",
    "etcd_debugging_store_expires_total": "v2_expires",
}
_GAUGES = {
    "etcd_debugging_mvcc_watch_stream_total": "watch_streams",
    "etcd_debugging_mvcc_watcher_total": "watchers",
    "etcd_debugging_store_watchers": "v2_watchers",
}
_V2_DELETES = {"delete", "compareAndDelete"}


@dataclass(frozen=True)
class Snapshot:
    commits: float = 0.0
    rpcs: float = 0.0
    messages: float = 0.0
    sent: float = 0.0
    received: float = 0.0
    db_size: float = 0.0
    db_in_use: float = 0.0
    keys: float = 0.0
    revision: float = 0.0
    failed_calls: Counter[str] = field(default_factory=Counter)  # gRPC code -> calls
    activity: dict[str, float] = field(default_factory=dict)  # _ACTIVITY, _GAUGES, v2_puts, v2_deletes


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """One read of etcd's /metrics (`http://HOST:CLIENT_PORT/metrics`)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return parse(answer.read().decode())


def parse(text: str) -> Snapshot:
    values: dict[str, float] = {}
    fallback: dict[str, float] = {}
    failed: Counter[str] = Counter()
    activity: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _ACTIVITY.get(sample.name) or _GAUGES.get(sample.name)
            if sample.name == "etcd_debugging_store_writes_total":
                name = "v2_deletes" if sample.labels.get("action") in _V2_DELETES else "v2_puts"
            if name:
                activity[name] = activity.get(name, 0.0) + sample.value
            if sample.name in _SUMMED:
                attr = _SUMMED[sample.name]
                values[attr] = values.get(attr, 0.0) + sample.value
            elif sample.name in _FALLBACK:
                fallback[_FALLBACK[sample.name]] = sample.value
            if sample.name == "grpc_server_handled_total" and sample.value:
                code = sample.labels.get("grpc_code", "?")
                if code not in _NOT_ERRORS:
                    failed[f"{code} {sample.labels.get('grpc_method', '?')}"] += int(sample.value)
    for attr, value in fallback.items():
        values.setdefault(attr, value)
    return Snapshot(**values, failed_calls=failed, activity=activity)


@dataclass(frozen=True)
class Cost:
    """What happened at etcd between two snapshots: counter increments, gauge changes."""

    commits: float
    rpcs: float
    messages: float
    sent: float
    received: float
    db_growth: float
    db_in_use_growth: float
    keys: float
    revisions: float
    failed_calls: Counter[str]
    activity: dict[str, float] = field(default_factory=dict)  # counters' increments, gauges' values

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Cost:
        gauges = set(_GAUGES.values())
        activity = {k: v if k in gauges else v - before.activity.get(k, 0.0) for k, v in after.activity.items()}
        return cls(
            commits=after.commits - before.commits,
            rpcs=after.rpcs - before.rpcs,
            messages=after.messages - before.messages,
            sent=after.sent - before.sent,
            received=after.received - before.received,
            db_growth=after.db_size - before.db_size,
            db_in_use_growth=after.db_in_use - before.db_in_use,
            keys=after.keys - before.keys,
            revisions=after.revision - before.revision,
            failed_calls=after.failed_calls - before.failed_calls,
            activity=activity,
        )

    def per_node(self, nodes: int) -> PerNode:
        n = max(nodes, 1)
        return PerNode(
            commits=self.commits / n,
            rpcs=self.rpcs / n,
            messages=self.messages / n,
            sent_kb=self.sent / n / 1024,
            received_kb=self.received / n / 1024,
            db_growth_kb=self.db_growth / 1024,
            db_in_use_growth_kb=self.db_in_use_growth / 1024,
            keys=self.keys,
            revisions=self.revisions,
            activity=dict(self.activity),
        )


@dataclass(frozen=True)
class PerNode:
    """A phase's cost as the table shows it: the counters per node, the database as a whole."""

    commits: float
    rpcs: float
    messages: float
    sent_kb: float
    received_kb: float
    db_growth_kb: float  # the whole database, not per node
    db_in_use_growth_kb: float
    keys: float  # keys added (negative: removed), whole database
    revisions: float  # revisions added, whole database
    activity: dict[str, float] = field(default_factory=dict)  # Cost.activity, whole database

    @classmethod
    def median(cls, items: list[PerNode]) -> PerNode | None:
        if not items:
            return None
        numbers = {f.name: statistics.median(getattr(i, f.name) for i in items) for f in fields(cls) if f.name != "activity"}
        names = {k for i in items for k in i.activity}
        activity = {k: statistics.median(i.activity.get(k, 0.0) for i in items) for k in names}
        return cls(**numbers, activity=activity)
