"""Requests before they are sent: keys and ranges, txn guards (Compare), txn operations (Op).

The request builders here serve both a txn's operations and the client's own KV calls, so a
put, range or delete is spelt one way. Nothing here talks to etcd.
"""

from __future__ import annotations

from collections.abc import Iterable

from rdzv.etcd.proto import etcd_min_pb2 as pb

Bytesish = str | bytes


def to_bytes(x: Bytesish) -> bytes:
    """A key or value as etcd stores it (str is UTF-8 encoded)."""
    return x.encode() if isinstance(x, str) else bytes(x)


def prefix_end(prefix: Bytesish) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's GetPrefixRangeEnd)."""
    end = bytearray(to_bytes(prefix))
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    # Empty or all-0xff prefix: "\0" means "to the end of the keyspace".
    return b"\0"


def key_range(
    key: Bytesish, range_end: Bytesish | None = None, prefix: bool = False
) -> tuple[bytes, bytes]:
    """``(key, range_end)`` as etcd takes them: ``prefix=True`` covers every key under ``key``."""
    k = to_bytes(key)
    if prefix:
        if range_end is not None:
            raise ValueError("give either prefix=True or range_end, not both")
        return k, prefix_end(k) if k else b"\0"
    return k, b"" if range_end is None else to_bytes(range_end)


_SORT_ORDER = {"none": 0, "ascend": 1, "descend": 2}
_SORT_TARGET = {"key": 0, "version": 1, "create": 2, "mod": 3, "value": 4}


def _enum(value: str | int | None, table: dict[str, int], what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; use one of {sorted(table)}") from None


def range_request(
    key: Bytesish,
    range_end: Bytesish | None = None,
    *,
    prefix: bool = False,
    revision: int = 0,
    limit: int = 0,
    count_only: bool = False,
    keys_only: bool = False,
    serializable: bool = False,
    sort_order: str | int | None = None,
    sort_target: str | int | None = None,
) -> pb.RangeRequest:
    k, end = key_range(key, range_end, prefix)
    return pb.RangeRequest(
        key=k,
        range_end=end,
        limit=limit,
        revision=revision,
        count_only=count_only,
        keys_only=keys_only,
        serializable=serializable,
        sort_order=_enum(sort_order, _SORT_ORDER, "sort_order"),
        sort_target=_enum(sort_target, _SORT_TARGET, "sort_target"),
    )


def put_request(key: Bytesish, value: Bytesish, lease: int = 0, ignore_value: bool = False) -> pb.PutRequest:
    """`ignore_value`: keep the key's value, change only its lease (the key must exist)."""
    return pb.PutRequest(key=to_bytes(key), value=to_bytes(value), lease=lease, ignore_value=ignore_value)


def delete_request(
    key: Bytesish, range_end: Bytesish | None = None, prefix: bool = False
) -> pb.DeleteRangeRequest:
    k, end = key_range(key, range_end, prefix)
    return pb.DeleteRangeRequest(key=k, range_end=end)


class Compare:
    """A txn guard. Build with ``Compare.version(k) > 0``, ``Compare.create_revision(k) == 0``,
    ``Compare.mod_revision(k) == rev``, ``Compare.value(k) == b"x"``, ``Compare.lease(k) == id``.
    Supported operators: ``==``, ``!=``, ``>``, ``<``."""

    __slots__ = ("pb",)

    def __init__(self, message: pb.Compare) -> None:
        self.pb = message

    @staticmethod
    def version(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.VERSION, "version", to_bytes(key), range_end)

    @staticmethod
    def create_revision(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.CREATE, "create_revision", to_bytes(key), range_end)

    @staticmethod
    def mod_revision(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.MOD, "mod_revision", to_bytes(key), range_end)

    @staticmethod
    def value(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.VALUE, "value", to_bytes(key), range_end)

    @staticmethod
    def lease(key: Bytesish, range_end: Bytesish | None = None) -> CompareTarget:
        return CompareTarget(pb.Compare.LEASE, "lease", to_bytes(key), range_end)

    def __repr__(self) -> str:
        message = self.pb
        op = {0: "==", 1: ">", 2: "<", 3: "!="}[message.result]
        field_name = message.WhichOneof("target_union")
        return f"Compare({field_name}({message.key!r}) {op} {getattr(message, field_name or 'version')!r})"


class CompareTarget:
    """Left-hand side of a :class:`Compare`; comparing it with a value yields the Compare."""

    __slots__ = ("_target", "_field", "_key", "_range_end")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, target: int, field_name: str, key: bytes, range_end: Bytesish | None
    ) -> None:
        self._target = target
        self._field = field_name
        self._key = key
        self._range_end = b"" if range_end is None else to_bytes(range_end)

    def _make(self, result: int, other: object) -> Compare:
        if self._field == "value":
            if not isinstance(other, str | bytes):
                raise TypeError("Compare.value(...) compares with str or bytes")
            val: object = to_bytes(other)
        else:
            if not isinstance(other, int) or isinstance(other, bool):
                raise TypeError(f"Compare.{self._field}(...) compares with an int")
            val = other
        message = pb.Compare(result=result, target=self._target, key=self._key, range_end=self._range_end)
        setattr(message, self._field, val)
        return Compare(message)

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(pb.Compare.EQUAL, other)

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(pb.Compare.NOT_EQUAL, other)

    def __gt__(self, other: object) -> Compare:
        return self._make(pb.Compare.GREATER, other)

    def __lt__(self, other: object) -> Compare:
        return self._make(pb.Compare.LESS, other)


class Op:
    """A txn operation: ``Op.put(k, v, lease=0)``, ``Op.get(k, prefix=False, ...)``,
    ``Op.delete(k, prefix=False)``, ``Op.txn(compares, success, failure)``."""

    __slots__ = ("pb",)

    def __init__(self, message: pb.RequestOp) -> None:
        self.pb = message

    @staticmethod
    def put(key: Bytesish, value: Bytesish, lease: int = 0, *, ignore_value: bool = False) -> Op:
        return Op(pb.RequestOp(request_put=put_request(key, value, lease, ignore_value)))

    @staticmethod
    def get(
        key: Bytesish,
        range_end: Bytesish | None = None,
        *,
        prefix: bool = False,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
        keys_only: bool = False,
        sort_order: str | int | None = None,
        sort_target: str | int | None = None,
    ) -> Op:
        req = range_request(
            key,
            range_end,
            prefix=prefix,
            revision=revision,
            limit=limit,
            count_only=count_only,
            keys_only=keys_only,
            sort_order=sort_order,
            sort_target=sort_target,
        )
        return Op(pb.RequestOp(request_range=req))

    @staticmethod
    def delete(key: Bytesish, range_end: Bytesish | None = None, *, prefix: bool = False) -> Op:
        return Op(pb.RequestOp(request_delete_range=delete_request(key, range_end, prefix)))

    @staticmethod
    def txn(
        compares: Iterable[Compare], success: Iterable[Op] = (), failure: Iterable[Op] = ()
    ) -> Op:
        return Op(pb.RequestOp(request_txn=txn_request(compares, success, failure)))

    def __repr__(self) -> str:
        return f"Op({self.pb.WhichOneof('request')})"


def txn_request(
    compares: Iterable[Compare], success: Iterable[Op], failure: Iterable[Op]
) -> pb.TxnRequest:
    return pb.TxnRequest(
        compare=[compare.pb for compare in compares],
        success=[op.pb for op in success],
        failure=[op.pb for op in failure],
    )
