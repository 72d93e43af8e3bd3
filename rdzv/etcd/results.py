"""What etcd answers, as plain frozen values: stored keys, range, txn and status results.

Each type is built from its protobuf message by ``from_pb``; nothing here talks to etcd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rdzv.etcd.proto import etcd_min_pb2 as pb


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as stored by etcd (mvccpb.KeyValue)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: pb.KeyValue) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class RangeResult:
    """Answer to a range read: ``revision`` is the store revision the read saw."""

    kvs: list[KeyValue]
    count: int
    more: bool
    revision: int

    @classmethod
    def from_pb(cls, r: pb.RangeResponse) -> RangeResult:
        return cls([KeyValue.from_pb(kv) for kv in r.kvs], r.count, r.more, r.header.revision)


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``responses`` follow the executed branch: RangeResult for gets, the revision for puts,
    the deleted count for deletes, TxnResult for nested txns."""

    succeeded: bool
    revision: int
    responses: list[RangeResult | int | TxnResult] = field(default_factory=list)

    @classmethod
    def from_pb(cls, r: pb.TxnResponse) -> TxnResult:
        out: list[RangeResult | int | TxnResult] = []
        rev = r.header.revision
        for op in r.responses:
            kind = op.WhichOneof("response")
            if kind == "response_range":
                out.append(RangeResult.from_pb(op.response_range))
            elif kind == "response_put":
                # Nested headers are not always filled in; every op of a txn shares its revision.
                out.append(rev)
            elif kind == "response_delete_range":
                out.append(op.response_delete_range.deleted)
            else:
                out.append(TxnResult.from_pb(op.response_txn))
        return cls(r.succeeded, rev, out)


@dataclass(frozen=True, slots=True)
class StatusResult:
    """Maintenance.Status of the member at ``endpoint``."""

    endpoint: str
    version: str
    member_id: int
    leader: int
    revision: int
    raft_term: int
    raft_index: int
    db_size: int
    is_learner: bool
    errors: tuple[str, ...]

    @classmethod
    def from_pb(cls, endpoint: str, resp: pb.StatusResponse) -> StatusResult:
        header = resp.header
        return cls(
            endpoint=endpoint,
            version=resp.version,
            member_id=int(header.member_id),
            leader=int(resp.leader),
            revision=int(header.revision),
            raft_term=int(resp.raftTerm),
            raft_index=int(resp.raftIndex),
            db_size=int(resp.dbSize),
            is_learner=bool(resp.isLearner),
            errors=tuple(resp.errors),
        )
