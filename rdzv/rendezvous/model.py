"""What the rendezvous stores: a record per node and a record per completed ("sealed") round.

Both are small JSON documents so that every backend can keep them as plain values. Anything
under a run's prefix may have been written by someone else (a person with etcdctl, another
tool, a future version), so decoding checks every field and raises `RecordError` instead of
whatever `json` or a constructor would raise; `node_entry` and `guard` turn that into the one
policy every backend follows: a node record that does not decode is not a node, a control
record that does not decode is noted in `Control.corrupt` and leaves the state as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

log = logging.getLogger("rdzv")

FORMAT = 1  # "v" of the records; a record without it is read as version 1
MAX_NODE_RECORD = 16 * 1024  # a node record is ~200 bytes
MAX_ROUND_RECORD = 1024 * 1024  # ids and hosts: ~80 bytes per node with 64-character hosts
MAX_NODE_ID = 128


class RecordError(ValueError):
    """A stored value that does not decode: not JSON, a missing or mistyped field, an unknown
    version, too big. The message says what is wrong; the caller knows (and names) the key."""


def _document(raw: bytes | str, limit: int, versions: tuple[int, ...] = (FORMAT,)) -> dict[str, object]:
    if len(raw) > limit:
        raise RecordError(f"{len(raw)} bytes, more than the {limit} a record may have")
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RecordError(f"not a JSON object but {type(doc).__name__}")
    version = doc.pop("v", FORMAT)
    if version not in versions or isinstance(version, bool):
        known = " and ".join(map(str, versions))
        raise RecordError(f"unknown record version {version!r} (this rdzv reads version {known})")
    doc["_version"] = version
    return doc


def _int(doc: dict[str, object], name: str, low: int = 0, high: int | None = None) -> int:
    value = doc.get(name)
    # bool is an int to Python, never to us
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise RecordError(f"field {name!r} must be an integer {bound}, not {value!r}"[:200])
    return value


def _optional_int(doc: dict[str, object], name: str) -> int | None:
    return None if doc.get(name) is None else _int(doc, name)


def _str(doc: dict[str, object], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, not {value!r}"[:200])
    return value


def parse_node_id(raw: bytes | str) -> str:
    """A node id as stored in a coordinator claim: short, printable, no separators."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise RecordError("node id is not UTF-8") from None
    if not text or len(text) > MAX_NODE_ID or not text.isprintable() or any(c in text for c in " /\t"):
        raise RecordError(f"not a node id: {text[:60]!r}")
    return text


def parse_node_ids(listed: list[str]) -> tuple[str, ...]:
    """`parse_node_id` for every id of a round record, checked at once: every member decodes
    the sealed record, and one call per id made that O(N) Python calls per node (the rules are
    the same: a joined string is printable, without separators, exactly when every id is)."""
    joined = ",".join(listed)
    if (
        not listed
        or min(map(len, listed)) == 0
        or max(map(len, listed)) > MAX_NODE_ID
        or not joined.isprintable()
        or any(c in joined for c in " /\t")
    ):
        return tuple(parse_node_id(i) for i in listed)  # names the first bad one
    return tuple(listed)


def parse_round_no(text: str) -> int:
    """A round number from a key name (zero-padded digits)."""
    if not text.isdigit() or not text.isascii():
        raise RecordError(f"not a round number: {text[:60]!r}")
    return int(text)


def parse_number(raw: bytes | str, what: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise RecordError(f"{what} is not a number: {raw[:60]!r}") from None
    if not math.isfinite(value):
        raise RecordError(f"{what} is not finite: {value!r}")
    return value


def parse_lease_id(raw: bytes | str) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise RecordError(f"lease id is not an integer: {raw[:60]!r}") from None
    if value <= 0 or value >= 1 << 63:
        raise RecordError(f"lease id out of range: {value}")
    return value


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

    def encode(self) -> bytes:
        doc = asdict(self)
        if doc["segment"] is None:
            del doc["segment"]  # unlabelled nodes write what older versions wrote
        return json.dumps({"v": FORMAT, **doc}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> NodeInfo:
        """Raises RecordError unless `raw` is a node record this version writes."""
        doc = _document(raw, MAX_NODE_RECORD)
        return cls(
            node_id=parse_node_id(_str(doc, "node_id")),
            host=_str(doc, "host"),
            addr=_str(doc, "addr"),
            pid=_int(doc, "pid"),
            port=_int(doc, "port", 0, 65535),
            want=_int(doc, "want"),
            rank_hint=_optional_int(doc, "rank_hint"),
            local_world_size=_optional_int(doc, "local_world_size"),
            failed=_int(doc, "failed") if "failed" in doc else 0,  # older records lack it
            segment=None if doc.get("segment") is None else _str(doc, "segment"),
        )


@dataclass(frozen=True)
class NodeEntry:
    """A live node as the backend sees it; `arrival` orders announcements (smaller = earlier).
    `session`: the backend's handle on the node's liveness where the seal needs it (etcd v3:
    its lease, which its assignment to the round is bound to), else 0."""

    info: NodeInfo
    arrival: int
    session: int = field(default=0, compare=False)


class Roster(Protocol):
    """Who is in a sealed round, by rank. Inline (`InlineRoster`) where the record lists every
    member; read on demand from the store where it does not (etcd v3: one key per member, so a
    member reads one key, not the whole round). Lookups may then raise the backend's
    connection errors."""

    def rank_of(self, node_id: str) -> int | None: ...

    def name_of(self, node_id: str) -> str: ...

    def ids(self) -> tuple[str, ...]: ...

    def hosts(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class InlineRoster:
    """Every member's id and host, in rank order."""

    listed: tuple[str, ...]
    host_names: tuple[str, ...] = ()  # empty in records of older versions

    @classmethod
    def of(cls, members: Mapping[str, Assignment]) -> InlineRoster:
        """The roster of the members' assignments (stored apart), in rank order."""
        ordered = sorted(members.items(), key=lambda item: item[1].rank)
        return cls(tuple(i for i, _ in ordered), tuple(a.host for _, a in ordered))

    @functools.cached_property
    def _ranks(self) -> dict[str, int]:
        # Looked up for every node of a big round: a dict, not a scan of `ids` each time.
        return {node_id: rank for rank, node_id in enumerate(self.listed)}

    @functools.cached_property
    def _host_counts(self) -> collections.Counter[str]:
        return collections.Counter(self.host_names)

    def rank_of(self, node_id: str) -> int | None:
        return self._ranks.get(node_id)

    def name_of(self, node_id: str) -> str:
        """How messages name a member: its host, with its id where hosts are not unique."""
        rank = self.rank_of(node_id)
        if rank is None or len(self.host_names) != len(self.listed):
            return node_id
        return display_name(self.host_names[rank], node_id, self._host_counts[self.host_names[rank]] > 1)

    def ids(self) -> tuple[str, ...]:
        return self.listed

    def hosts(self) -> tuple[str, ...]:
        return self.host_names


def display_name(host: str, node_id: str, shared_host: bool) -> str:
    """'host7', or 'host7[<id>]' when several members run on that host."""
    return f"{host}[{node_id}]" if shared_host else host


class DetachedRoster:
    """The roster of a round record decoded without its store: a header (`RoundRecord.HEADER`)
    until the backend that read it attaches the store's roster (`RoundRecord.with_roster`)."""

    def _missing(self) -> RecordError:
        return RecordError("a sealed-round header read without its roster")

    def rank_of(self, node_id: str) -> int | None:
        raise self._missing()

    def name_of(self, node_id: str) -> str:
        return node_id

    def ids(self) -> tuple[str, ...]:
        raise self._missing()

    def hosts(self) -> tuple[str, ...]:
        raise self._missing()


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
        doc = _document(raw, MAX_NODE_RECORD)
        return cls(rank=_int(doc, "rank"), host=_str(doc, "host"), name=_str(doc, "name"))


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
        doc = _document(raw, MAX_ROUND_RECORD, versions=(FORMAT, cls.HEADER))
        version = doc.pop("_version")
        min_nodes = _int(doc, "min_nodes", 1)
        header: dict[str, Any] = dict(
            round=_int(doc, "round", 1),
            master_addr=_str(doc, "master_addr"),
            master_port=_int(doc, "master_port", 0, 65535),
            min_nodes=min_nodes,
            max_nodes=_int(doc, "max_nodes", min_nodes),
            restarts=_int(doc, "restarts") if "restarts" in doc else 0,  # older records lack it
            view_cursor=_int(doc, "since") if "since" in doc else 0,  # older records lack it
            blame=_str(doc, "blame") if "blame" in doc else "",  # older records lack both
            strikes=_int(doc, "strikes") if "strikes" in doc else 0,
            cursor=cursor,
        )
        if version == cls.HEADER:
            head = _id_list(doc, "head", allow_empty=False)
            size = _int(doc, "size", 1)
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
        doc = _document(raw, MAX_NODE_RECORD)
        missing = doc.get("missing", [])
        if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
            raise RecordError("field 'missing' must be a list of names")
        return cls(
            joined=_int(doc, "joined"), newcomers=_int(doc, "newcomers"),
            rejoining=_int(doc, "rejoining"), not_back=_int(doc, "not_back"),
            missing=tuple(missing[:MISSING_SHOWN]),
        )


@dataclass
class Control:
    """The run's control state: latest sealed round, closed flag, who coordinates which round."""

    sealed: RoundRecord | None = None
    closed: bool = False
    coordinators: dict[int, str] = field(default_factory=dict)
    last_call: dict[int, float] = field(default_factory=dict)  # round -> wall-clock deadline
    progress: dict[int, RoundProgress] = field(default_factory=dict)  # forming round -> its coordinator's report
    # What a seal compares against to know control is unchanged (etcd v3: the sealed record's
    # mod revision; etcd v2 and c10d: the state document itself). Not a cursor.
    token: object = None
    # The cursor of the latest change a feed delivered (0: none, or a backend that does not
    # track it).
    cursor: int = 0
    # Control records that do not decode: key -> what is wrong. The fields above stay as they
    # were before such a write, so running members keep working; the next join refuses.
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def round(self) -> int:
        """Number of the latest sealed round (0 before the first)."""
        return self.sealed.round if self.sealed else 0

    def set_coordinator(self, round_no: int, holder: str | None) -> None:
        """Round `round_no` is claimed by `holder`, or no longer claimed (None)."""
        if holder is None:
            self.coordinators.pop(round_no, None)
        else:
            self.coordinators[round_no] = holder

    def set_last_call(self, round_no: int, deadline: float | None) -> None:
        """Round `round_no`'s last call ends at `deadline` (wall clock), or was withdrawn (None)."""
        if deadline is None:
            self.last_call.pop(round_no, None)
        else:
            self.last_call[round_no] = deadline

    def set_progress(self, round_no: int, progress: RoundProgress | None) -> None:
        """Round `round_no`'s coordinator reported `progress`, or its report is gone (None)."""
        if progress is None:
            self.progress.pop(round_no, None)
        else:
            self.progress[round_no] = progress

    def reset_to(self, fresh: Control) -> None:
        """Take every field of `fresh`: a feed that started over from a new read."""
        self.__dict__.update(fresh.__dict__)


# Keys already warned about, per process: a bad record is seen by every feed and every read,
# and one line naming it is enough. Bounded so a flood of bad keys cannot grow it forever.
_warned: set[str] = set()
_warned_lock = threading.Lock()
_WARNED_MAX = 1024


def _first_time(key: str) -> bool:
    with _warned_lock:
        if key in _warned:
            return False
        if len(_warned) >= _WARNED_MAX:
            _warned.clear()
        _warned.add(key)
        return True


def _forget(key: str) -> None:
    with _warned_lock:
        _warned.discard(key)  # valid again: warn anew if it breaks again


@contextmanager
def guard(control: Control, key: str) -> Iterator[None]:
    """Apply one control record inside: if it does not decode (RecordError, raised before the
    body changed `control`), note it in `control.corrupt` and warn once; if it does, clear any
    old note."""
    try:
        yield
    except RecordError as exc:
        control.corrupt[key] = str(exc)
        if _first_time(key):
            log.warning(
                "rendezvous: %s does not hold a valid record (%s); running workers go on, but "
                "no new round can form until it is removed",
                key, exc,
            )
    else:
        if control.corrupt.pop(key, None) is not None:
            _forget(key)


def not_a_node(key: str, why: str) -> None:
    """Say (once per key and process) that the record at `key` is ignored, and why."""
    if _first_time(key):
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
    _forget(key)
    return NodeEntry(info, arrival)
