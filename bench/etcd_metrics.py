"""etcd's own counters, read from its /metrics, for what one phase of a benchmark cost etcd.

    before = scrape(url); ...; cost = Cost.between(before, scrape(url))
    cost.per_node(n)   # the per-node figures the formation table shows

Counters (monotonic): raft proposals committed, gRPC calls started (unary requests and streams
opened), gRPC messages received (every keep-alive and watch request on an open stream counts),
bytes etcd sent to and received from clients, and calls that ended with a code other than OK
(by code; Canceled, the normal end of a stream a client closes, is left out). Gauges: the
database file's size and the part of it in use, the number of keys, the current revision.
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


def scrape(url: str, timeout: float = 10.0) -> Snapshot:
    """One read of etcd's /metrics (`http://HOST:CLIENT_PORT/metrics`)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return parse(answer.read().decode())


def parse(text: str) -> Snapshot:
    values: dict[str, float] = {}
    fallback: dict[str, float] = {}
    failed: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
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
    return Snapshot(**values, failed_calls=failed)


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

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Cost:
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

    @classmethod
    def median(cls, items: list[PerNode]) -> PerNode | None:
        if not items:
            return None
        return cls(**{f.name: statistics.median(getattr(i, f.name) for i in items) for f in fields(cls)})
