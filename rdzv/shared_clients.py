"""Process-wide clients, one per configuration key, reference-counted and fork-aware.

Used by both etcd clients (`EtcdClient.shared`, `EtcdV2Client.shared`). A fork()ed child starts
with an empty registry: the parent's clients (shared or not) are disowned and kept referenced,
so that the child neither reuses nor tears down connections that are still the parent's.
Torch-free.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class SharedClients(Generic[C]):
    """One client per key, counted by `acquire` and `release`; `track` every client created
    (shared or not) so that a fork()ed child can hand each one to `disown`."""

    def __init__(self, disown: Callable[[C], None], reusable: Callable[[C], bool] = lambda _: True) -> None:
        self._disown = disown
        self._reusable = reusable
        self._lock = threading.Lock()
        self._by_key: dict[Hashable, C] = {}
        self._refs: dict[C, tuple[Hashable, int]] = {}  # held client -> (its key, references)
        self._live: weakref.WeakSet[C] = weakref.WeakSet()
        # A child's inherited clients, kept referenced: freeing one could tear down the
        # parent's connections.
        self._inherited: list[C] = []
        os.register_at_fork(after_in_child=self._after_fork)

    def track(self, client: C) -> None:
        """Note a new client (a fork()ed child disowns it)."""
        self._live.add(client)

    def acquire(self, key: Hashable, factory: Callable[[], C]) -> C:
        """The client for `key` (made by `factory` if there is none, or none still usable),
        with one more reference; every caller must `release` it."""
        with self._lock:
            client = self._by_key.get(key)
            if client is None or not self._reusable(client):
                client = self._by_key[key] = factory()
            _, refs = self._refs.get(client, (key, 0))
            self._refs[client] = (key, refs + 1)
            return client

    def release(self, client: C) -> bool:
        """Drop one reference; True when none is left (or the client was never shared): the
        caller then tears the client down."""
        with self._lock:
            held = self._refs.get(client)
            if held is None:
                return True
            key, refs = held
            if refs > 1:
                self._refs[client] = (key, refs - 1)
                return False
            del self._refs[client]
            if self._by_key.get(key) is client:
                del self._by_key[key]
            return True

    def refcount(self, client: C) -> int:
        """References held on `client` (0 for one that is not shared, or released by all)."""
        with self._lock:
            return self._refs.get(client, (None, 0))[1]

    def _after_fork(self) -> None:
        # The parent's locks may have been held at fork time, its clients' threads are gone.
        self._lock = threading.Lock()
        self._by_key = {}
        self._refs = {}
        inherited = list(self._live)
        for client in inherited:
            self._disown(client)
        self._inherited.extend(inherited)
        self._live = weakref.WeakSet()
