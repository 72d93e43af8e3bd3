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
from collections.abc import Callable
from typing import Any, TypeVar

import etcd
from torch.distributed import DistStoreError

from rdzv.backends.common.kv_store import Cursor, KeyChanges, Version, VersionedStore
from rdzv.backends.common.store_values import to_bytes
from rdzv.backends.etcd_v2.client import REMOVED, EtcdV2Client, EtcdV2Error, index_of, whole_seconds

T = TypeVar("T")
# One long poll of a v2 watch waits at most this long, then is asked again.
WATCH_POLL_MAX = 30.0


def key_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def name_of(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


def pack(value: bytes) -> str:
    return base64.b64encode(value).decode()


def unpack(text: str | None) -> bytes:
    return base64.b64decode(text or "")


class EtcdV2Store(VersionedStore):
    """A torch Store in one v2 directory. Keys expire `ttl` s after their last write: v2 can
    only expire keys one by one, and refreshing every key of a round would cost a write per key
    per interval, so a crashed job's round store goes away on a fixed clock instead."""

    _client_errors = (EtcdV2Error, etcd.EtcdException)

    def __init__(
        self, client: EtcdV2Client, directory: str, *, ttl: float, timeout: float = 300.0
    ) -> None:
        super().__init__(f"etcd v2 store {directory.rstrip('/')}", timeout)
        self._client = client
        self._dir = directory.rstrip("/")
        self._ttl = whole_seconds(ttl)

    def _path(self, name: str) -> str:
        return f"{self._dir}/{key_of(name)}"

    def _patiently(self, what: str, call: Callable[[], T], deadline: float | None = None) -> T:
        # The v2 client tries other members itself; nothing here is worth trying again.
        with self._errors(what):
            return call()

    # ------------------------------------------------------------------ writes
    def set(self, key: str, value: str | bytes) -> None:
        with self._errors(f"set({key!r})"):
            self._client.write(self._path(key), pack(to_bytes(value)), ttl=self._ttl)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        try:
            node = self._client.read(self._path(key))
        except etcd.EtcdKeyNotFound:
            return None
        return unpack(node.value), node.modifiedIndex

    def _write_if_unchanged(self, key: str, value: bytes, version: Version | None) -> bool:
        guard: dict[str, Any] = {"prevIndex": version} if version is not None else {"prevExist": False}
        try:
            self._client.write(self._path(key), pack(value), ttl=self._ttl, **guard)
            return True
        except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
            return False

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

    def _read_keys(self, keys: list[str]) -> tuple[dict[str, bytes], Cursor]:
        return self._snapshot()

    def _watch_keys(self, keys: list[str], cursor: Cursor) -> KeyChanges:
        return _PolledKeys(self._client, self._dir, {self._path(k): k for k in keys}, cursor, self._snapshot)

    def _timed_out(self, seconds: float, missing: list[str]) -> DistStoreError:
        shown = ", ".join(missing[:5])
        return DistStoreError(
            f"etcd v2 store {self._dir}: timed out after {seconds:g} s waiting for "
            f"{len(missing)} key(s): {shown}"
        )


class _PolledKeys:
    """Writes of some keys of a directory after an etcd index: one long poll per event of the
    directory (v2 watches one key or one tree, and delivers one event per request)."""

    def __init__(
        self,
        client: EtcdV2Client,
        directory: str,
        names: dict[str, str],
        index: int,
        reread: Callable[[], tuple[dict[str, bytes], int]],
    ) -> None:
        self._client = client
        self._dir = directory
        self._names = names  # path -> key
        self._index = index
        self._reread = reread

    def next(self, seconds: float) -> list[tuple[str, bytes]]:
        try:
            event = self._client.watch(self._dir, self._index + 1, min(seconds, WATCH_POLL_MAX))
        except etcd.EtcdWatchTimedOut:
            return []
        except etcd.EtcdEventIndexCleared:
            # History moved past us: start over from a fresh read of the directory.
            values, self._index = self._reread()
            return [(k, values[k]) for k in self._names.values() if k in values]
        self._index = event.modifiedIndex
        name = self._names.get(event.key)
        if name is None or event.action in REMOVED:
            return []
        return [(name, unpack(event.value))]

    def close(self) -> None:
        pass  # nothing stays open between long polls
