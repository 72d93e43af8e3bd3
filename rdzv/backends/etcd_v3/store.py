"""A `torch.distributed.Store` over etcd v3, scoped to one key prefix (one rendezvous round).

torch's agent runs on it unchanged: rank assignment (set, multi_get, multi_set, get) and the
exit barrier (add, set, wait). Blocking reads wait on a watch of exactly the missing keys, never
by polling, and every wait is bounded by the store's timeout. A request that finds etcd
unreachable (stalled, restarting, without quorum) is tried again within that same timeout: the
agent would have waited that long for a slow peer anyway. `add` is the exception: a lost answer
leaves unknown whether it counted, so it is not repeated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from torch.distributed import DistStoreError

from rdzv.backends.common.kv_store import Cursor, KeyChanges, Version, VersionedStore
from rdzv.backends.common.store_values import to_bytes
from rdzv.backoff import Backoff
from rdzv.etcd import (
    Compare,
    EtcdClient,
    EtcdConnectionError,
    EtcdError,
    EtcdTLSError,
    Op,
    Watch,
)

T = TypeVar("T")

# etcd rejects transactions with more than --max-txn-ops (default 128) operations.
TXN_BATCH = 64
# Pauses between attempts while etcd is unreachable: drawn from [0, cap], the cap doubling from
# RETRY_FIRST to RETRY_MAX s.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class EtcdStore(VersionedStore):
    """torch's Store interface over the etcd v3 keys below `prefix`, written on `lease`."""

    _client_errors = (EtcdError,)

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
        data = to_bytes(value)
        self._patiently(
            f"set({key!r})",
            lambda: self._client.put(self._key(key), data, lease=self._lease, idempotent=True),
        )

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        pairs = list(zip(keys, values, strict=True))
        for start in range(0, len(pairs), TXN_BATCH):
            ops = [
                Op.put(self._key(k), to_bytes(v), lease=self._lease)
                for k, v in pairs[start : start + TXN_BATCH]
            ]
            self._patiently("multi_set", lambda ops=ops: self._client.txn([], ops, [], idempotent=True))

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        kv = self._client.get(self._key(key))
        return (kv.value, kv.mod_revision) if kv is not None else None

    def _write_if_unchanged(self, key: str, value: bytes, version: Version | None) -> bool:
        full = self._key(key)
        # An absent key's mod revision compares as 0.
        result = self._client.txn(
            [Compare.mod_revision(full) == (version or 0)],
            [Op.put(full, value, lease=self._lease)],
            [],
        )
        return result.succeeded

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
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

    def delete_key(self, key: str) -> bool:
        return self._patiently(
            f"delete_key({key!r})", lambda: self._client.delete(self._key(key), idempotent=True) > 0
        )

    # ------------------------------------------------------------------ reads
    def check(self, keys: list[str]) -> bool:
        return self._patiently("check", lambda: all(self._read_keys(keys)[0].get(k) is not None for k in keys))

    def num_keys(self) -> int:
        return self._patiently(
            "num_keys",
            lambda: self._client.range(self._prefix.encode(), prefix=True, count_only=True).count,
        )

    def _read_keys(self, keys: list[str]) -> tuple[dict[str, bytes], Cursor]:
        found: dict[str, bytes] = {}
        revision = 0
        for start in range(0, len(keys), TXN_BATCH):
            batch = keys[start : start + TXN_BATCH]
            # Read-only: safe to repeat on another member.
            result = self._client.txn([], [Op.get(self._key(k)) for k in batch], [], idempotent=True)
            revision = revision or result.revision
            for k, response in zip(batch, result.responses, strict=True):
                if response.kvs:
                    found[k] = response.kvs[0].value
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
