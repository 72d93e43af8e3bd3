"""A `torch.distributed.Store` for one rendezvous round over etcd's v2 HTTP API.

The v2 API has no transactions, no leases and no batched reads; what it costs us:

* every write is one HTTP request (and one raft proposal); `multi_set` is N of them;
* blocking reads wait on a recursive `waitIndex` watch of the store's directory: one long poll
  per event, never a polling loop, re-read from scratch when etcd's 1000-event history moved
  past us (`EtcdEventIndexCleared`, the v2 counterpart of compaction);
* `add` is a read plus a compare-and-swap on the key's modifiedIndex, retried on a conflict.

Keys and values are base64url so any torch key (with '/' or spaces) and any bytes fit in a
v2 path and value.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import etcd
from torch.distributed import DistStoreError, Store

from rdzv.backends.common.store_values import to_bytes
from rdzv.backends.etcd_v2.client import REMOVED, EtcdV2Client, EtcdV2Error, index_of, whole_seconds


def key_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def name_of(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


def pack(value: bytes) -> str:
    return base64.b64encode(value).decode()


def unpack(text: str | None) -> bytes:
    return base64.b64decode(text or "")


class EtcdV2Store(Store):
    """A torch Store in one v2 directory. Keys expire `ttl` s after their last write: v2 can
    only expire keys one by one, and refreshing every key of a round would cost a write per key
    per interval, so a crashed job's round store goes away on a fixed clock instead."""

    def __init__(
        self, client: EtcdV2Client, directory: str, *, ttl: float, timeout: float = 300.0
    ) -> None:
        super().__init__()
        self._client = client
        self._dir = directory.rstrip("/")
        self._ttl = whole_seconds(ttl)
        self.set_timeout(timedelta(seconds=timeout))

    def _path(self, name: str) -> str:
        return f"{self._dir}/{key_of(name)}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (EtcdV2Error, etcd.EtcdException) as exc:
            raise DistStoreError(f"etcd v2 store {self._dir}: {what} failed: {exc}") from exc

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: str | bytes) -> None:
        with self._errors(f"set({key!r})"):
            self._client.write(self._path(key), pack(to_bytes(value)), ttl=self._ttl)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def add(self, key: str, amount: int) -> int:
        path = self._path(key)
        with self._errors(f"add({key!r})"):
            while True:
                try:
                    node = self._client.read(path)
                except etcd.EtcdKeyNotFound:
                    node = None
                total = amount + (int(unpack(node.value)) if node is not None else 0)
                guard: dict[str, Any] = (
                    {"prevIndex": node.modifiedIndex} if node is not None else {"prevExist": False}
                )
                try:
                    self._client.write(path, pack(str(total).encode()), ttl=self._ttl, **guard)
                    return total
                except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                    continue  # somebody else added in between: read again

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        path, expected_value, new = self._path(key), to_bytes(expected), to_bytes(desired)
        guard: dict[str, Any] = {"prevExist": False} if not expected_value else {"prevValue": pack(expected_value)}
        with self._errors(f"compare_set({key!r})"):
            try:
                self._client.write(path, pack(new), ttl=self._ttl, **guard)
                return new
            except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                found = self._snapshot()[0].get(key)
        return expected_value if found is None else found  # torch's answer for a missing key: `expected`

    def delete_key(self, key: str) -> bool:
        with self._errors(f"delete_key({key!r})"):
            try:
                self._client.delete(self._path(key))
                return True
            except etcd.EtcdKeyNotFound:
                return False

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> bytes:
        return self._wait_for([key], self.timeout)[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        found = self._wait_for(keys, self.timeout)
        return [found[k] for k in keys]

    def check(self, keys: list[str]) -> bool:
        with self._errors("check"):
            if len(keys) == 1:
                # The exit barrier polls one key: read just it, not the round's directory.
                try:
                    self._client.read(self._path(keys[0]))
                    return True
                except etcd.EtcdKeyNotFound:
                    return False
            present = self._snapshot()[0]
        return all(k in present for k in keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, timeout if timeout is not None else self.timeout)

    def num_keys(self) -> int:
        with self._errors("num_keys"):
            return len(self._snapshot()[0])

    def _snapshot(self) -> tuple[dict[str, bytes], int]:
        """Every key of the directory (one request) and the etcd index to watch after."""
        try:
            result = self._client.read(self._dir, recursive=True)
        except etcd.EtcdKeyNotFound as exc:
            return {}, index_of(exc)
        values = {
            name_of(n.key.rsplit("/", 1)[1]): unpack(n.value) for n in result.leaves if not n.dir
        }
        return values, result.etcd_index

    def _wait_for(self, keys: list[str], timeout: timedelta) -> dict[str, bytes]:
        limit = timeout.total_seconds()
        deadline = time.monotonic() + limit
        with self._errors("wait"):
            values, index = self._snapshot()
            wanted = {self._path(k): k for k in keys if k not in values}
            while wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    shown = ", ".join(sorted(wanted.values())[:5])
                    raise DistStoreError(
                        f"etcd v2 store {self._dir}: timed out after {limit:g} s waiting for "
                        f"{len(wanted)} key(s): {shown}"
                    )
                try:
                    event = self._client.watch(self._dir, index + 1, min(left, 30.0))
                except etcd.EtcdWatchTimedOut:
                    continue
                except etcd.EtcdEventIndexCleared:
                    values, index = self._snapshot()  # history moved past us: start over
                    wanted = {p: k for p, k in wanted.items() if k not in values}
                    continue
                index = event.modifiedIndex
                name = wanted.get(event.key)
                if name is not None and event.action not in REMOVED:
                    values[name] = unpack(event.value)
                    del wanted[event.key]
        return values
