"""A torch Store that opens the store it stands for on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch.distributed import Store

from rdzv.rendezvous.delegating_store import DelegatingStore


class LazyStore(DelegatingStore):
    """A round's store that connects on first use: every new TCPStore connection costs the
    server a reverse DNS lookup of the peer, so callers that never use it (the formation
    benchmark, a spare that exits) should not pay for one."""

    def __init__(self, open_store: Callable[[], Store]) -> None:
        super().__init__()
        self._open = open_store
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def inner(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = self._open()
            return self._store
