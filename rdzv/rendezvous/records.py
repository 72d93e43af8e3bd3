"""What the rendezvous writes to the store: a record per node (`NodeInfo`), a record per sealed
round (`RoundRecord`: every member listed, or a header with one `Assignment` per member stored
apart) and a forming round's published progress (`RoundProgress`). Small JSON documents, so
every backend keeps them as plain values; `node_entry` is the one policy for a node record
that does not decode: it is not a node."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from rdzv.rendezvous.decoding import (
    FORMAT,
    MAX_NODE_RECORD,
    MAX_ROUND_RECORD,
    RecordError,
    document,
    first_warning,
    forget_warning,
    int_field,
    optional_int_field,
    parse_node_id,
    parse_node_ids,
    str_field,
)
from rdzv.rendezvous.roster import DetachedRoster, InlineRoster, Roster

log = logging.getLogger("rdzv")

@dataclass(frozen=True)
class NodeInfo:
    """One node's announcement: who it is and which round it wants to be in."""

    node_id: str
    host: str  # sort key for new ranks (natural order)
    addr: str  # where this node's workers can be reached (MASTER_ADDR if it becomes rank 0)
    pid: int
    port: int  # a free port on this node, MASTER_PORT if it becomes rank 0
    want: int  # the round this node asks to join
    rank_hint: int | None = None
    local_world_size: int | None = None
    # The round in which this node's workers failed with no member of it gone (0: none): what
    # the coordinator charges against the job's restart budget when it seals the next round.
    failed: int = 0
    # The node's segment (NVLink domain) label, or None (rdzv.rendezvous.segments).
    segment: str | None = None
    # The role of the node's workers (torch's WorkerSpec.role) when its launcher says (rdzv-launch).
    role: str | None = None

    def encode(self) -> bytes:
        doc = asdict(self)
        for optional in ("segment", "role"):
            if doc[optional] is None:
                del doc[optional]  # unset: what older versions wrote
        return json.dumps({"v": FORMAT, **doc}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> NodeInfo:
        """Raises RecordError unless `raw` is a node record this version writes."""
        doc = document(raw, MAX_NODE_RECORD)
        return cls(
            node_id=parse_node_id(str_field(doc, "node_id")),
            host=str_field(doc, "host"),
            addr=str_field(doc, "addr"),
            pid=int_field(doc, "pid"),
            port=int_field(doc, "port", 0, 65535),
            want=int_field(doc, "want"),
            rank_hint=optional_int_field(doc, "rank_hint"),
            local_world_size=optional_int_field(doc, "local_world_size"),
            failed=int_field(doc, "failed") if "failed" in doc else 0,  # older records lack it
            segment=None if doc.get("segment") is None else str_field(doc, "segment"),
            role=None if doc.get("role") is None else str_field(doc, "role"),
        )


@dataclass(frozen=True)
class NodeEntry:
    """A live node as the backend sees it; `arrival` orders announcements (smaller = earlier).
    `session`: the backend's handle on the node's liveness where the seal needs it (etcd v3:
    its lease, which its assignment to the round is bound to), else 0."""

    info: NodeInfo
    arrival: int
    session: int = field(default=0, compare=False)



@dataclass(frozen=True)
class Assignment:
    """One member's place in a sealed round, stored apart from the round's header (etcd v3)."""

    rank: int
    host: str
    name: str  # as messages name the member (`display_name`)

    def encode(self) -> bytes:
        doc = {"v": FORMAT, "rank": self.rank, "host": self.host, "name": self.name}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Assignment:
        doc = document(raw, MAX_NODE_RECORD)
        return cls(rank=int_field(doc, "rank"), host=str_field(doc, "host"), name=str_field(doc, "name"))


MISSING_SHOWN = 20  # names of members not back that a progress report carries
HEAD_RANKS = 2  # ids of the first ranks a round header names (the run's keepers, rank 0)


@dataclass(frozen=True)
class RoundRecord:
    """A completed round: its size, the bootstrap address of rank 0, the restart count, and
    who is in it (`roster`): inline in the record, or stored apart (a header, `HEADER`)."""

    HEADER: ClassVar[int] = 2  # "v" of a record whose roster is stored apart

    round: int
    size: int
    master_addr: str
    master_port: int
    min_nodes: int
    max_nodes: int
    # Worker-failure restarts the job has used up to this round: one count for every node.
    restarts: int = 0
    # Ids of ranks 0 .. HEAD_RANKS-1 (the run's keepers), known without the roster.
    head: tuple[str, ...] = ()
    roster: Roster = field(default_factory=DetachedRoster, compare=False, repr=False)
    # The host the latest counted restart was charged to, and how many counted restarts in a
    # row were charged to it (rdzv.rendezvous.quarantine); written only when set.
    blame: str = ""
    strikes: int = 0
    # Workers per node when every member announced the same count and the same role (0: not
    # known to be so): torch's agent then assigns worker ranks without the store.
    identical: int = 0
    # The cursor where the coordinator's view of the nodes ended (0: unknown), stored as
    # "since". Members watch from there, so a node that vanished between that view and the
    # seal is still seen as lost.
    view_cursor: int = field(default=0, compare=False)
    # Set by the backend when read, never stored in the record: the seal's cursor.
    cursor: int = field(default=0, compare=False)

    @classmethod
    def listing(cls, ids: Sequence[str], hosts: Sequence[str] = (), **header: Any) -> RoundRecord:
        """A record whose roster is inline: `ids` in rank order, their `hosts`."""
        return cls(size=len(ids), head=tuple(ids[:HEAD_RANKS]), roster=InlineRoster(tuple(ids), tuple(hosts)), **header)

    def with_roster(self, roster: Roster) -> RoundRecord:
        return dataclasses.replace(self, roster=roster)

    @property
    def watch_cursor(self) -> int:
        """Where members of this round start watching."""
        return self.view_cursor or self.cursor

    @property
    def world_size(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size >= self.max_nodes

    @property
    def ids(self) -> tuple[str, ...]:
        """Every member in rank order (read from the store when the roster is stored apart)."""
        return self.roster.ids()

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.roster.hosts()

    def rank_of(self, node_id: str) -> int | None:
        return self.roster.rank_of(node_id)

    def name_of(self, node_id: str) -> str:
        """How messages name a member: its host, with its id where hosts are not unique."""
        return self.roster.name_of(node_id)

    def _common(self) -> dict[str, object]:
        return {
            "round": self.round, "master_addr": self.master_addr, "master_port": self.master_port,
            "min_nodes": self.min_nodes, "max_nodes": self.max_nodes, "restarts": self.restarts,
            "since": self.view_cursor,  # the stored name
            # The quarantine count (constant size), only when set: otherwise the record older
            # versions wrote.
            **({"blame": self.blame, "strikes": self.strikes} if self.strikes else {}),
            **({"identical": self.identical} if self.identical else {}),
        }

    def encode(self) -> bytes:
        """The record with every member listed (the roster must be at hand)."""
        doc = {"v": FORMAT, **self._common(), "ids": list(self.ids), "hosts": list(self.hosts)}
        return json.dumps(doc, separators=(",", ":")).encode()

    def encode_header(self) -> bytes:
        """The record without its roster: constant size, whatever the round's size."""
        doc = {"v": self.HEADER, **self._common(), "size": self.size, "head": list(self.head)}
        return json.dumps(doc, separators=(",", ":")).encode()

    def assignments(self) -> dict[str, Assignment]:
        """Each member's `Assignment`, to store apart from `encode_header` (roster at hand)."""
        hosts = self.hosts
        return {
            node_id: Assignment(rank, hosts[rank] if len(hosts) == self.size else "", self.name_of(node_id))
            for rank, node_id in enumerate(self.ids)
        }

    @classmethod
    def decode(cls, raw: bytes | str, cursor: int = 0) -> RoundRecord:
        """Raises RecordError unless `raw` is a round record this version writes: with its
        members listed, or a header (its roster then `DetachedRoster` until attached)."""
        doc = document(raw, MAX_ROUND_RECORD, versions=(FORMAT, cls.HEADER))
        version = doc.pop("_version")
        min_nodes = int_field(doc, "min_nodes", 1)
        header: dict[str, Any] = dict(
            round=int_field(doc, "round", 1),
            master_addr=str_field(doc, "master_addr"),
            master_port=int_field(doc, "master_port", 0, 65535),
            min_nodes=min_nodes,
            max_nodes=int_field(doc, "max_nodes", min_nodes),
            restarts=int_field(doc, "restarts") if "restarts" in doc else 0,  # older records lack it
            view_cursor=int_field(doc, "since") if "since" in doc else 0,  # older records lack it
            blame=str_field(doc, "blame") if "blame" in doc else "",  # older records lack both
            strikes=int_field(doc, "strikes") if "strikes" in doc else 0,
            identical=int_field(doc, "identical") if "identical" in doc else 0,  # older records lack it
            cursor=cursor,
        )
        if version == cls.HEADER:
            head = _id_list(doc, "head", allow_empty=False)
            size = int_field(doc, "size", 1)
            if len(head) != min(size, HEAD_RANKS):
                raise RecordError(f"field 'head' must name the first {min(size, HEAD_RANKS)} ranks")
            return cls(size=size, head=head, **header)
        ids = _id_list(doc, "ids", allow_empty=False)
        hosts = doc.get("hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise RecordError("field 'hosts' must be a list of host names")
        if hosts and len(hosts) != len(ids):
            raise RecordError("field 'hosts' must name as many hosts as 'ids' names nodes")
        return cls.listing(ids, tuple(hosts), **header)


def _id_list(doc: dict[str, object], name: str, *, allow_empty: bool) -> tuple[str, ...]:
    listed = doc.get(name)
    if not isinstance(listed, list) or not (listed or allow_empty) or not all(isinstance(i, str) for i in listed):
        raise RecordError(f"field {name!r} must be a non-empty list of node ids")
    ids = parse_node_ids(listed)
    if len(set(ids)) != len(ids):
        raise RecordError(f"field {name!r} names a node twice")
    return ids


@dataclass(frozen=True)
class RoundProgress:
    """How a forming round stands, as its coordinator publishes it (small, whatever the
    round's size): members of the running round learn from it that they should make room
    (newcomers, members asking for a new round), waiting nodes report it."""

    joined: int  # nodes eligible for the round
    newcomers: int  # of them, nodes that were not in the previous round
    rejoining: int  # of them, live members of the previous round
    not_back: int  # live members of the previous round still in it
    missing: tuple[str, ...] = ()  # the first MISSING_SHOWN names of previous members not back

    def encode(self) -> bytes:
        doc = {"v": FORMAT, **asdict(self), "missing": list(self.missing[:MISSING_SHOWN])}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> RoundProgress:
        doc = document(raw, MAX_NODE_RECORD)
        missing = doc.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise RecordError("field 'missing' must be a list of names")
        return cls(
            joined=int_field(doc, "joined"), newcomers=int_field(doc, "newcomers"),
            rejoining=int_field(doc, "rejoining"), not_back=int_field(doc, "not_back"),
            missing=tuple(missing[:MISSING_SHOWN]),
        )



def not_a_node(key: str, why: str) -> None:
    """Say (once per key and process) that the record at `key` is ignored, and why."""
    if first_warning(key):
        log.warning("rendezvous: ignoring %s: not a node record (%s)", key, why)


def node_entry(key: str, node_id: str, raw: bytes | str, arrival: int) -> NodeEntry | None:
    """The node announced at `key` (whose name ends in `node_id`), or None when the record
    there does not decode or names another node: such a record is not a node (for the
    algorithm it is as if the key were absent). Warns once per key."""
    try:
        info = NodeInfo.decode(raw)
        if info.node_id != node_id:
            raise RecordError(f"it names node {info.node_id!r}")
    except RecordError as exc:
        not_a_node(key, str(exc))
        return None
    forget_warning(key)
    return NodeEntry(info, arrival)
