"""What the rendezvous stores: a record per node and a record per completed ("sealed") round.

Both are small JSON documents so that every backend can keep them as plain values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> NodeInfo:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class NodeEntry:
    """A live node as the backend sees it; `arrival` orders announcements (smaller = earlier)."""

    info: NodeInfo
    arrival: int


@dataclass(frozen=True)
class RoundRecord:
    """A completed round: node ids in rank order and the bootstrap address of rank 0."""

    round: int
    ids: tuple[str, ...]
    master_addr: str
    master_port: int
    min_nodes: int
    max_nodes: int
    # Where the coordinator's view of the nodes ended (0: unknown). Members watch from there,
    # so a node that vanished between that view and the seal is still seen as lost.
    since: int = field(default=0, compare=False)
    # Set by the backend when read: an ordering token (etcd revision) of the seal.
    revision: int = field(default=0, compare=False)

    @property
    def watch_from(self) -> int:
        return self.since or self.revision

    @property
    def world_size(self) -> int:
        return len(self.ids)

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.max_nodes

    def rank_of(self, node_id: str) -> int | None:
        try:
            return self.ids.index(node_id)
        except ValueError:
            return None

    def encode(self) -> bytes:
        doc = asdict(self)
        doc.pop("revision")
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, revision: int = 0) -> RoundRecord:
        doc = json.loads(raw)
        doc["ids"] = tuple(doc["ids"])
        return cls(**doc, revision=revision)


@dataclass
class Control:
    """The run's control state: latest sealed round, closed flag, who coordinates which round."""

    sealed: RoundRecord | None = None
    closed: bool = False
    coordinators: dict[int, str] = field(default_factory=dict)
    last_call: dict[int, float] = field(default_factory=dict)  # round -> wall-clock deadline
    # Backend-specific compare token for sealing (etcd: mod revision of the sealed record).
    token: object = None
    # The latest change a feed delivered (etcd: revision; 0 where the backend has no cursor).
    seen: int = 0

    @property
    def round(self) -> int:
        """Number of the latest sealed round (0 before the first)."""
        return self.sealed.round if self.sealed else 0
