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
from datetime import timedelta
from typing import TypeVar

from torch.distributed import DistStoreError, Store

from rdzv.backends.common.store_values import to_bytes
from rdzv.backoff import Backoff
from rdzv.etcd import Compare, EtcdClient, EtcdConnectionError, EtcdError, EtcdTLSError, Op

T = TypeVar("T")

# etcd rejects transactions with more than --max-txn-ops (default 128) operations.
TXN_BATCH = 64
# Pauses between attempts while etcd is unreachable: drawn from [0, cap], the cap doubling from
# RETRY_FIRST to RETRY_MAX s.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0


class EtcdStore(Store):
    """torch's Store interface over the etcd v3 keys below `prefix`, written on `lease`."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        lease: int = 0,
        timeout: float = 300.0,
    ) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix
        self._lease = lease
        self.set_timeout(timedelta(seconds=timeout))

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def _fail(self, what: str, exc: Exception) -> DistStoreError:
        return DistStoreError(f"etcd store {self._prefix}: {what} failed: {exc}")

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

    def add(self, key: str, amount: int) -> int:
        """Atomic counter: read, then compare-and-put on the key's mod revision."""
        full = self._key(key)
        try:
            while True:
                kv = self._client.get(full)
                try:
                    current = int(kv.value) if kv is not None else 0
                except ValueError:
                    # As TCPStore: a counter that is not a number is the caller's store error.
                    raise DistStoreError(
                        f"etcd store {self._prefix}: add({key!r}): the value is not an integer: "
                        f"{kv.value[:60]!r}"
                    ) from None
                expected = kv.mod_revision if kv is not None else 0
                new = current + amount
                result = self._client.txn(
                    [Compare.mod_revision(full) == expected],
                    [Op.put(full, str(new).encode(), lease=self._lease)],
                    [],
                )
                if result.succeeded:
                    return new
        except EtcdError as exc:
            raise self._fail(f"add({key!r})", exc) from exc

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
    def get(self, key: str) -> bytes:
        return self.multi_get([key])[0]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        values = self._wait_for(keys, self.timeout)
        return [values[k] for k in keys]

    def check(self, keys: list[str]) -> bool:
        return self._patiently("check", lambda: all(self._read(keys)[0].get(k) is not None for k in keys))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, timeout if timeout is not None else self.timeout)

    def num_keys(self) -> int:
        return self._patiently(
            "num_keys",
            lambda: self._client.range(self._prefix.encode(), prefix=True, count_only=True).count,
        )

    def _read(self, keys: list[str]) -> tuple[dict[str, bytes], int]:
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

    def _wait_for(self, keys: list[str], timeout: timedelta) -> dict[str, bytes]:
        deadline = time.monotonic() + timeout.total_seconds()
        return self._patiently("wait", lambda: self._wait_once(keys, timeout, deadline), deadline)

    def _wait_once(self, keys: list[str], timeout: timedelta, deadline: float) -> dict[str, bytes]:
        found, revision = self._read(keys)
        missing = {self._key(k): k for k in keys if k not in found}
        if not missing:
            return found
        # One watch over the span of the missing keys, from just after our read.
        low, high = min(missing), max(missing)
        watch = self._client.watch(low, range_end=high + b"\0", start_revision=revision + 1)
        try:
            while missing:
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = ", ".join(sorted(missing.values())[:5])
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    raise DistStoreError(
                        f"etcd store {self._prefix}: timed out after "
                        f"{timeout.total_seconds():g} s waiting for key(s) {shown}{more}"
                    )
                for event in watch.get(left) or ():
                    name = missing.get(event.kv.key)
                    if name is not None and event.type == "PUT":
                        found[name] = event.kv.value
                        del missing[event.kv.key]
        finally:
            watch.cancel()
        return found
