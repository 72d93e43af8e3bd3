"""Counters (`Store.add`) on etcd v3 that N adders do not contend on.

A compare-and-set counter makes N simultaneous adders retry O(N) times each: O(N^2) raft
proposals for one exit barrier. Here each `add` writes a key of its own under the counter and,
in the same transaction, counts the adds that exist at that revision: one request and one
raft commit per add whatever N, and every adder still gets a distinct running total (the adds
are ordered by their revisions), as an atomic counter would give.

The counter `K` of a store with prefix `P` is:

    P + K                          its base: what `set` wrote, or "0" from the first add;
                                   it exists while the counter does (`check`, `wait` see it)
    P + "\\0add1/" + K + "\\0" + id  one key per add of 1 (counted, values not read)
    P + "\\0addn/" + K + "\\0" + id  one key per other amount (read and summed: rare)

Its value is base + the number of unit adds + the sum of the others. "\\0" sorts before any
key torch writes, so the adds sit apart from the store's own keys.
"""

from __future__ import annotations

import uuid

from rdzv.etcd import Op, RangeResult, TxnResult

ADDS = "\0add"  # the adds of every counter of a store sit below P + ADDS
UNIT, OTHER = "\0add1/", "\0addn/"
OPS_PER_KEY = 3  # reading a key: its base and its two kinds of adds


class Counter:
    """The keys of counter `name` in the store whose prefix is `prefix`."""

    def __init__(self, prefix: str, name: str) -> None:
        self.base = (prefix + name).encode()
        self.unit = (prefix + UNIT + name + "\0").encode()
        self.other = (prefix + OTHER + name + "\0").encode()

    def add_key(self, amount: int) -> bytes:
        """A fresh key for one add of `amount`."""
        return (self.unit if amount == 1 else self.other) + uuid.uuid4().hex.encode()

    def reads(self) -> list[Op]:
        """The base, the unit adds counted, the other adds: `value` reads their answers."""
        return [
            Op.get(self.base),
            Op.get(self.unit, prefix=True, count_only=True),
            Op.get(self.other, prefix=True),
        ]

    def clears(self) -> list[Op]:
        """Delete every add (a `set` or `delete_key` of the counter starts it afresh)."""
        return [Op.delete(self.unit, prefix=True), Op.delete(self.other, prefix=True)]


def value(base: RangeResult, unit: RangeResult, other: RangeResult) -> bytes | None:
    """The key's value from `Counter.reads` answers: the base as stored when nothing was added
    (any key, counter or not), else base + adds; None when the key does not exist."""
    if not base.kvs:
        return None
    stored = base.kvs[0].value
    if not unit.count and not other.kvs:
        return stored
    try:
        return str(int(stored) + unit.count + sum(int(kv.value) for kv in other.kvs)).encode()
    except ValueError:
        return stored  # a `set` of a non-number racing an add: the set is what stands


def answers(result: TxnResult, start: int) -> tuple[RangeResult, RangeResult, RangeResult]:
    """The three answers of one key's `reads`, at `start` among a txn's responses."""
    base, unit, other = result.responses[start : start + OPS_PER_KEY]
    assert isinstance(base, RangeResult) and isinstance(unit, RangeResult) and isinstance(other, RangeResult)
    return base, unit, other
