"""The torch `Store` algorithms the etcd v3 and v2 stores share, over a narrow per-backend interface.

`add` is a read and a write guarded by the version read, done again when another writer came in
between (etcd v2; etcd v3 replaces it with adds that do not contend, etcd_v3/counters.py). A
blocking read (`get`, `multi_get`, `wait`) reads the keys once, then waits for writes of the
missing ones until the deadline: never a polling loop. Each backend supplies its
client calls (the hooks below), which of its errors become torch's `DistStoreError` and which
are retried, and its wording of a timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Protocol, TypeVar

from torch.distributed import DistStoreError, Store

T = TypeVar("T")
# A key's version as its backend counts it (etcd v3: mod revision; v2: modifiedIndex), and a
# point in a backend's history to watch from (v3: revision; v2: etcd index).
Version = int
Cursor = int


class KeyChanges(Protocol):
    """Writes of a fixed set of keys, from a cursor on: what a backend's watch hands over."""

    def next(self, seconds: float) -> Iterable[tuple[str, bytes]]:
        """The (key, value) pairs written within `seconds` (none if nothing came); may repeat
        or include keys already found."""
        ...

    def close(self) -> None: ...


class VersionedStore(Store):
    """A torch Store whose `add` and blocking reads are written once, here, over the hooks."""

    def __init__(self, label: str, timeout: float) -> None:
        super().__init__()
        self._label = label  # names the store in its errors, e.g. "etcd store /rdzv/job/1/"
        self.set_timeout(timedelta(seconds=timeout))

    # The backend client's errors: each becomes a DistStoreError, as TCPStore's errors are.
    _client_errors: tuple[type[Exception], ...] = ()
    # Whether a key's value is more than its latest write (etcd v3's counters): keys a wait saw
    # written are read once more for their value.
    _read_after_watch = False

    def _fail(self, what: str, exc: Exception) -> DistStoreError:
        return DistStoreError(f"{self._label}: {what} failed: {exc}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """A context in which the client's errors become DistStoreError naming `what`."""
        try:
            yield
        except self._client_errors as exc:
            raise self._fail(what, exc) from exc

    # ------------------------------------------------------------- the backend's hooks
    def _patiently(self, what: str, call: Callable[[], T], deadline: float | None = None) -> T:
        """`call()` with the backend's errors converted, tried again where the backend can
        tell a passing outage, until the monotonic `deadline`."""
        raise NotImplementedError

    def _read_versioned(self, key: str) -> tuple[bytes, Version] | None:
        """The key's value and version, or None if it does not exist."""
        raise NotImplementedError

    def _write_if_unchanged(self, key: str, value: bytes, version: Version | None) -> bool:
        """Write `value` if the key is still at `version` (None: still absent); False if not."""
        raise NotImplementedError

    def _read_keys(self, keys: list[str]) -> tuple[dict[str, bytes], Cursor]:
        """The values of those of `keys` that exist (possibly more), and the cursor to watch
        from for later writes."""
        raise NotImplementedError

    def _watch_keys(self, keys: list[str], cursor: Cursor) -> KeyChanges:
        """Writes of `keys` after `cursor`."""
        raise NotImplementedError

    def _timed_out(self, seconds: float, missing: list[str]) -> DistStoreError:
        """The error for a wait of `seconds` that ended with the sorted keys `missing`."""
        raise NotImplementedError

    # ------------------------------------------------------------- the shared algorithms
    def add(self, key: str, amount: int) -> int:
        """Atomic counter: read, then write guarded by the version read. Not repeated after a
        lost answer: whether that write counted is unknown."""
        with self._errors(f"add({key!r})"):
            while True:
                read = self._read_versioned(key)
                value, version = read if read is not None else (b"", None)
                try:
                    current = int(value) if read is not None else 0
                except ValueError:
                    # As TCPStore: a counter that is not a number is the caller's store error.
                    raise DistStoreError(
                        f"{self._label}: add({key!r}): the value is not an integer: "
                        f"{value[:60]!r}"
                    ) from None
                total = current + amount
                if self._write_if_unchanged(key, str(total).encode(), version):
                    return total
                # Somebody else wrote in between: read again.

    def get(self, key: str) -> bytes:
        return self._wait_for([key], self.timeout)[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        found = self._wait_for(keys, self.timeout)
        return [found[k] for k in keys]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, timeout if timeout is not None else self.timeout, values=False)

    def _wait_for(self, keys: list[str], timeout: timedelta, *, values: bool = True) -> dict[str, bytes]:
        """The keys' values once all exist (`values` False: only that they do)."""
        seconds = timeout.total_seconds()
        deadline = time.monotonic() + seconds
        return self._patiently("wait", lambda: self._wait_once(keys, seconds, deadline, values), deadline)

    def _wait_once(self, keys: list[str], seconds: float, deadline: float, values: bool) -> dict[str, bytes]:
        found, cursor = self._read_keys(keys)
        missing = {k for k in keys if k not in found}
        if not missing:
            return found
        # Watched from just after the read: no write in between is missed.
        watched = sorted(missing)
        with contextlib.closing(self._watch_keys(watched, cursor)) as changes:
            while missing:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timed_out(seconds, sorted(missing))
                for name, value in changes.next(left):
                    if name in missing:
                        found[name] = value
                        missing.discard(name)
        if values and self._read_after_watch:
            found.update(self._read_keys(watched)[0])
        return found

