"""A torch Store that opens the store it stands for on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import Store


class LazyStore(Store):
    """A round's store that connects on first use: every new TCPStore connection costs the
    server a reverse DNS lookup of the peer, so callers that never use it (the formation
    benchmark, a spare that exits) should not pay for one."""

    def __init__(self, open_store: Callable[[], Store]) -> None:
        super().__init__()
        self._open = open_store
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def _inner(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = self._open()
            return self._store

    def set(self, key: str, value: str | bytes) -> None:
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        return self._inner.get(key)

    def add(self, key: str, amount: int) -> int:
        return self._inner.add(key, amount)

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        return self._inner.compare_set(key, expected, desired)

    def append(self, key: str, value: str | bytes) -> None:
        self._inner.append(key, value)

    def check(self, keys: list[str]) -> bool:
        return self._inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self._inner.wait(keys)
        else:
            self._inner.wait(keys, timeout)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._inner.multi_get(keys)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self._inner.multi_set(keys, values)

    def delete_key(self, key: str) -> bool:
        return self._inner.delete_key(key)

    def num_keys(self) -> int:
        return self._inner.num_keys()
