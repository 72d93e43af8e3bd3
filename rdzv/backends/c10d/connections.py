"""This node's connections to the run's TCPStore: opened on first use, a spare one kept for
each blocking feed, one for the agent's round stores, and the change logs written on them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import TCPStore

from rdzv.backends.c10d.host import Opener
from rdzv.backends.c10d.store import C10dLayout, OpCounts, StoreConnection
from rdzv.backends.common.state_document import encode_state

ROUND_STORE_TIMEOUT = 300.0


def pack_cursor(all_pos: int, ctl_pos: int) -> int:
    """The two log positions as one cursor."""
    return (all_pos << 32) | ctl_pos


def unpack_cursor(cursor: int) -> tuple[int, int]:
    return cursor >> 32, cursor & 0xFFFFFFFF


class C10dConnections:
    """The run's store as this node reaches it; `on_open` runs once the first connection is up."""

    def __init__(self, run_prefix: str, opener: Opener, on_open: Callable[[], None]) -> None:
        self.counts = OpCounts()  # store operations of this node, for cost reports
        self._run_prefix = run_prefix
        self._opener = opener
        self._on_open = on_open
        self._conn: StoreConnection | None = None
        self._keys: C10dLayout | None = None
        self._open_lock = threading.Lock()
        self._lock = threading.Lock()
        self._spares: list[StoreConnection] = []  # for feeds; a connect may be slow
        self._agent_conn: StoreConnection | None = None  # the agent's round stores, reused

    @property
    def opened(self) -> bool:
        return self._conn is not None

    @property
    def conn(self) -> StoreConnection:
        if self._conn is None:
            with self._open_lock:
                if self._conn is None:
                    conn = self._opener(self.counts)
                    self._keys = self._prepare(conn)
                    # The connection the first feed blocks on, opened now so that forming a
                    # round opens none (each new connection costs the server a name lookup).
                    self._spares.append(conn.clone())
                    self._conn = conn
                    self._on_open()
        return self._conn

    @property
    def keys(self) -> C10dLayout:
        if self._keys is None:
            _ = self.conn
        assert self._keys is not None
        return self._keys

    def _prepare(self, conn: StoreConnection) -> C10dLayout:
        """Create the keys readers `get` (a get of a missing key would block)."""
        keys = C10dLayout(self._run_prefix, conn.add(f"{self._run_prefix}/gen", 0))
        conn.compare_set(keys.state, "", encode_state(None, closed=False))
        conn.append(keys.ids, "")
        conn.add(keys.all.seq, 0)
        conn.add(keys.ctl.seq, 0)
        return keys

    def borrow(self) -> StoreConnection:
        """A connection of its own, for a feed that blocks on it; `give_back` when done."""
        with self._lock:
            if self._spares:
                return self._spares.pop()
        return self.conn.clone()

    def give_back(self, conn: StoreConnection) -> None:
        with self._lock:
            self._spares.append(conn)

    def drop_spares(self) -> None:
        with self._lock:
            self._spares.clear()

    def log(self, name: str, *, control: bool) -> None:
        """Record that key `name` changed (its value is already written)."""
        if control:
            self.keys.ctl.append(self.conn, name)
        self.keys.all.append(self.conn, name)

    def position(self, *more: str) -> tuple[int, list[bytes]]:
        """The log positions (a cursor) and the keys `more`, read in one atomic multi_get."""
        keys = self.keys
        values = self.conn.multi_get([keys.all.seq, keys.ctl.seq, *more])
        return pack_cursor(int(values[0]), int(values[1])), values[2:]

    def agent_store(self) -> TCPStore:
        """The agent's connection: it blocks on it (barriers) without holding up ours."""
        with self._lock:
            if self._agent_conn is None:
                self._agent_conn = self.conn.clone()
                self._agent_conn.store.set_timeout(timedelta(seconds=ROUND_STORE_TIMEOUT))
            return self._agent_conn.store
