"""A sealed round's members as etcd v3 stores them: one rank key per member, read on demand.

A member reads its own key (a few dozen bytes) instead of a record listing the whole round;
the coordinator of the next round, `rdzv status` and the event feed read them all, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.etcd import EtcdClient, prefix_end
from rdzv.rendezvous.decoding import RecordError, parse_node_id
from rdzv.rendezvous.records import Assignment, not_a_node


class EtcdRoster:
    """`Roster` of one round, over its rank keys (`EtcdV3Layout.ranks`), cached as read."""

    def __init__(self, client: EtcdClient, prefix: str, describe: Callable[[], str]) -> None:
        self._client = client
        self._prefix = prefix
        self._describe = describe
        self._known: dict[str, Assignment | None] = {}
        self._listed: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def learn(self, assignments: Mapping[str, Assignment]) -> None:
        """Assignments read elsewhere (the seal that wrote them, a member's delete event)."""
        self._known.update(assignments)

    def _assignment(self, node_id: str) -> Assignment | None:
        if node_id not in self._known:
            key = self._prefix + node_id
            with etcd_errors(self._describe()):
                kv = self._client.get(key)
            self._known[node_id] = None if kv is None else decode(key, node_id, kv.value)
        return self._known[node_id]

    def rank_of(self, node_id: str) -> int | None:
        found = self._assignment(node_id)
        return found.rank if found is not None else None

    def name_of(self, node_id: str) -> str:
        found = self._known.get(node_id)  # names are for messages: no request for one
        return found.name if found is not None else node_id

    def _all(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self._listed is None:
            start = self._prefix.encode()
            with etcd_errors(self._describe()):
                result = self._client.range(start, range_end=prefix_end(start))
            found: dict[str, Assignment] = {}
            for kv in result.kvs:
                key = kv.key.decode(errors="replace")
                node_id = key[len(self._prefix) :]
                assignment = decode(key, node_id, kv.value)
                if assignment is not None:
                    found[node_id] = assignment
            self._known.update(found)
            ordered = sorted(found.items(), key=lambda item: item[1].rank)
            self._listed = (tuple(i for i, _ in ordered), tuple(a.host for _, a in ordered))
        return self._listed

    def ids(self) -> tuple[str, ...]:
        return self._all()[0]

    def hosts(self) -> tuple[str, ...]:
        return self._all()[1]


def decode(key: str, node_id: str, raw: bytes) -> Assignment | None:
    """The assignment of `node_id` at `key`, or None (warned once) when it holds none."""
    try:
        parse_node_id(node_id)
        return Assignment.decode(raw)
    except RecordError as exc:
        not_a_node(key, f"not a member's assignment: {exc}")
        return None
