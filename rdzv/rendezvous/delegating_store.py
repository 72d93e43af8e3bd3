"""A torch `Store` that passes every call to another store.

Subclasses say which store by overriding `inner`, and override only the calls they change:
`LazyStore` opens its store on first use, `GuardedRoundStore` ends blocking reads early.
"""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import Store


class DelegatingStore(Store):
    """Passes every `Store` call to `inner`, which subclasses supply."""

    @property
    def inner(self) -> Store:
        raise NotImplementedError

    def set(self, key: str, value: str | bytes) -> None:
        self.inner.set(key, value)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        return self.inner.compare_set(key, expected, desired)

    def append(self, key: str, value: str | bytes) -> None:
        self.inner.append(key, value)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self.inner.multi_get(keys)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self.inner.multi_set(keys, values)

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()
