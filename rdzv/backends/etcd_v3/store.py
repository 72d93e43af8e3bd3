"""A `torch.distributed.Store` over etcd v3, scoped to one key prefix (one rendezvous round).

torch's agent runs on it unchanged: rank assignment (set, multi_get, multi_set, get) and the
exit barrier (add, set, wait). `add` does not contend (etcd_v3/counters.py): one request per add,
however many nodes add at once. Blocking reads wait on a watch of exactly the missing keys,
never by polling, and every wait is bounded by the store's timeout. A request that finds etcd
unreachable (stalled, restarting, without quorum) is tried again within that same timeout: the
agent would have waited that long for a slow peer anyway. `add` is the exception: a lost answer
leaves unknown whether it counted, so it is not repeated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from torch.distributed import DistStoreError

from rdzv.backends.common.kv_store import Cursor, KeyChanges, VersionedStore
from rdzv.backends.common.store_values import to_bytes
from rdzv.backends.etcd_v3.counters import ADDS, OPS_PER_KEY, Counter, answers, value
from rdzv.backoff import Backoff
from rdzv.etcd import (
    Compare,
    EtcdClient,
    EtcdConnectionError,
    EtcdError,
    EtcdTLSError,
    Op,
    RangeResult,
    Watch,
    prefix_end,
)

T = TypeVar("T")

# etcd rejects transactions with more than --max-txn-ops (default 128) operations: keys per txn
# when each costs `OPS_PER_KEY` operations (a read or a write also covers a counter's adds).
TXN_BATCH = 128 // OPS_PER_KEY
# Pauses between attempts while etcd is unreachable: drawn from [0, cap], the cap doubling from
# RETRY_FIRST to RETRY_MAX s.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class EtcdStore(VersionedStore):
    """torch's Store interface over the etcd v3 keys below `prefix`, written on `lease`."""

    _client_errors = (EtcdError,)
    _read_after_watch = True  # a counter's first write is its base, not its value

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        lease: int = 0,
        timeout: float = 300.0,
    ) -> None:
        super().__init__(f"etcd store {prefix}", timeout)
        self._client = client
        self._prefix = prefix
        self._lease = lease

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def _patiently(self, what: str, call: Callable[[], T], deadline: float | None = None) -> T:
        """`call()`, tried again while etcd is unreachable until `deadline` (monotonic; default:
        the store's timeout from now). Errors become DistStoreError, as TCPStore's."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout.total_seconds()
        pauses = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            try:
                return call()
            except EtcdTLSError as exc:
                raise self._fail(what, exc) from exc
            except EtcdConnectionError as exc:
                # Give up now rather than wake past the deadline only to fail there.
                pause = pauses.pause()
                if time.monotonic() + pause >= deadline:
                    raise self._fail(what, exc) from exc
                time.sleep(pause)
            except EtcdError as exc:
                raise self._fail(what, exc) from exc

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: str | bytes) -> None:
        self.multi_set([key], [value], what=f"set({key!r})")

    def multi_set(self, keys: list[str], values: list[str | bytes], *, what: str = "multi_set") -> None:
        # A set replaces a counter's adds too (TCPStore: the value is what was set).
        pairs = list(zip(keys, values, strict=True))
        for start in range(0, len(pairs), TXN_BATCH):
            ops = [
                op for k, v in pairs[start : start + TXN_BATCH]
                for op in (Op.put(self._key(k), to_bytes(v), lease=self._lease), *Counter(self._prefix, k).clears())
            ]
            self._patiently(what, lambda ops=ops: self._client.txn([], ops, [], idempotent=True))

    def add(self, key: str, amount: int) -> int:
        """One key of its own per add, counted with the others in the same txn: no retries
        however many nodes add at once. Not repeated after a lost answer (it may have counted)."""
        counter = Counter(self._prefix, key)
        mine = counter.add_key(amount)
        put = Op.put(mine, str(amount).encode(), lease=self._lease)
        with self._errors(f"add({key!r})"):
            result = self._client.txn(
                [Compare.create_revision(counter.base) == 0],
                [Op.put(counter.base, b"0", lease=self._lease), put, *counter.reads()],
                [put, *counter.reads()],
            )
            total = value(*answers(result, 2 if result.succeeded else 1))  # after the puts
            if total is not None and total.lstrip(b"-").isdigit():
                return int(total)
            # As TCPStore: a counter that is not a number is the caller's store error.
            self._client.delete(mine)
        shown = (total or b"")[:60]
        raise DistStoreError(f"etcd store {self._prefix}: add({key!r}): the value is not an integer: {shown!r}")

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        self._patiently(f"compare_set({key!r})", lambda: self._fold(key))
        full = self._key(key)
        expected_value, new = to_bytes(expected), to_bytes(desired)
        guard = Compare.create_revision(full) == 0 if expected_value == b"" else Compare.value(full) == expected_value
        # Safe to repeat: if a lost first attempt applied, the retry reads back `desired`.
        result = self._patiently(
            f"compare_set({key!r})",
            lambda: self._client.txn(
                [guard], [Op.put(full, new, lease=self._lease)], [Op.get(full)], idempotent=True
            ),
        )
        if result.succeeded:
            return new
        kvs = result.responses[0].kvs
        return kvs[0].value if kvs else expected_value

    def _fold(self, key: str) -> None:
        """Fold a counter's adds into its base, so that a compare sees the counter's value;
        done again if an add came in between."""
        counter = Counter(self._prefix, key)
        while True:
            read = self._client.txn([], counter.reads(), [], idempotent=True)
            base, unit, other = answers(read, 0)
            total = value(base, unit, other)
            if total is None or (not unit.count and not other.kvs):
                return
            unchanged = [
                Compare.mod_revision(counter.base) == base.kvs[0].mod_revision,
                Compare.mod_revision(counter.unit, prefix_end(counter.unit)) < read.revision + 1,
                Compare.mod_revision(counter.other, prefix_end(counter.other)) < read.revision + 1,
            ]
            puts = [Op.put(counter.base, total, lease=self._lease), *counter.clears()]
            if self._client.txn(unchanged, puts, [], idempotent=True).succeeded:
                return

    def delete_key(self, key: str) -> bool:
        ops = [Op.delete(self._key(key)), *Counter(self._prefix, key).clears()]
        result = self._patiently(f"delete_key({key!r})", lambda: self._client.txn([], ops, [], idempotent=True))
        return int(result.responses[0]) > 0  # type: ignore[arg-type]

    # ------------------------------------------------------------------ reads
    def check(self, keys: list[str]) -> bool:
        return self._patiently("check", lambda: all(self._read_keys(keys)[0].get(k) is not None for k in keys))

    def num_keys(self) -> int:
        # The store's keys, not the counters' adds (which sit below prefix + ADDS).
        ops = [Op.get(self._prefix, prefix=True, count_only=True), Op.get(self._prefix + ADDS, prefix=True, count_only=True)]
        result = self._patiently("num_keys", lambda: self._client.txn([], ops, [], idempotent=True))
        everything, adds = result.responses
        assert isinstance(everything, RangeResult) and isinstance(adds, RangeResult)
        return everything.count - adds.count

    def _read_keys(self, keys: list[str]) -> tuple[dict[str, bytes], Cursor]:
        found: dict[str, bytes] = {}
        revision = 0
        for start in range(0, len(keys), TXN_BATCH):
            batch = keys[start : start + TXN_BATCH]
            ops = [op for k in batch for op in Counter(self._prefix, k).reads()]
            # Read-only: safe to repeat on another member.
            result = self._client.txn([], ops, [], idempotent=True)
            revision = revision or result.revision
            for i, k in enumerate(batch):
                current = value(*answers(result, i * OPS_PER_KEY))
                if current is not None:
                    found[k] = current
        return found, revision

    def _watch_keys(self, keys: list[str], cursor: Cursor) -> KeyChanges:
        return _WatchedKeys(self._client, {self._key(k): k for k in keys}, cursor)

    def _timed_out(self, seconds: float, missing: list[str]) -> DistStoreError:
        shown = ", ".join(missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return DistStoreError(
            f"etcd store {self._prefix}: timed out after "
            f"{seconds:g} s waiting for key(s) {shown}{more}"
        )


class _WatchedKeys:
    """Puts of some keys after a revision: one watch over the span of the keys."""

    def __init__(self, client: EtcdClient, names: dict[bytes, str], revision: int) -> None:
        self._names = names
        low, high = min(names), max(names)
        self._watch: Watch = client.watch(low, range_end=high + b"\0", start_revision=revision + 1)

    def next(self, seconds: float) -> list[tuple[str, bytes]]:
        return [
            (self._names[e.kv.key], e.kv.value)
            for e in self._watch.get(seconds) or ()
            if e.type == "PUT" and e.kv.key in self._names
        ]

    def close(self) -> None:
        self._watch.cancel()
