"""Heartbeat counters standing in for leases on a TCPStore (the c10d backend's liveness).

Each node bumps its counter every lease_ttl/3 (one `add`); a counter that has not moved for
lease_ttl marks its node dead. Checking is done by a few, not all: the coordinator of a forming
round and rank 0 of the running round read every counter with one `multi_get` per interval;
waiting nodes check the coordinator they wait for and members check rank 0 (one `get` each).
The checker that wins `compare_set(counter, last seen, "0")` removes the node's record and
claim, as an expired lease would. A node whose counter was reset sees it at its next bump and
re-joins. Detection takes lease_ttl to lease_ttl + lease_ttl/3.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from rdzv.backends.api import LIVENESS
from rdzv.backends.c10d.store import C10dLayout, StoreConnection
from rdzv.rendezvous.records import RoundRecord

log = logging.getLogger("rdzv")


class Heartbeats:
    """This node's counter, and the other nodes' counters it is responsible for checking."""

    capabilities = frozenset({LIVENESS})

    def __init__(self, lease_ttl: float, run_id: str) -> None:
        self._lease_ttl = lease_ttl
        self._run_id = run_id
        self._lock = threading.Lock()
        self._node_id: str | None = None
        self._last: int | None = None  # our counter, None until the first announce
        self._sealed: RoundRecord | None = None  # latest sealed round seen: who checks whom
        self._waited_for: dict[object, frozenset[str]] = {}  # coordinators, per waiting feed
        self._counters: dict[str, tuple[bytes, float]] = {}  # node id -> (counter, since when)

    def restart(self) -> None:
        """A new incarnation of this node: its counter starts again with the next announce."""
        with self._lock:
            self._last = None

    def start(self, conn: StoreConnection, keys: C10dLayout, node_id: str) -> None:
        """Start beating for `node_id` (at an announce; nothing to do once started)."""
        with self._lock:
            self._node_id = node_id
            if self._last is not None:
                return
        value = conn.add(keys.heartbeat(node_id), 1)
        with self._lock:
            self._last = value

    def beat(self, conn: StoreConnection, keys: C10dLayout) -> bool:
        """Bump our counter; False when a checker had reset it (we were declared dead)."""
        with self._lock:
            node_id, last = self._node_id, self._last
        if node_id is None or last is None:
            return True
        value = conn.add(keys.heartbeat(node_id), 1)
        with self._lock:
            if value <= last:
                return False
            self._last = value
        return True

    def note_sealed(self, sealed: RoundRecord) -> None:
        """A sealed round was read: its rank 0 is checked by its members, and checks them."""
        with self._lock:
            if self._sealed is None or sealed.round >= self._sealed.round:
                self._sealed = sealed

    def wait_for(self, feed: object, coordinators: frozenset[str]) -> None:
        """`feed` waits for a seal from `coordinators`: they must stay alive to make it."""
        with self._lock:
            self._waited_for[feed] = coordinators - {self._node_id}

    def forget(self, feed: object) -> None:
        with self._lock:
            self._waited_for.pop(feed, None)

    def check(
        self, conn: StoreConnection, keys: C10dLayout, *, coordinating: bool, remove: Callable[[str], None]
    ) -> None:
        """Read the counters this node checks; `remove` the nodes whose counter stood still for
        lease_ttl, once this node won the reset of their counter."""
        with self._lock:
            me, sealed = self._node_id, self._sealed
            rank = sealed.rank_of(me) if sealed is not None and me is not None else None
            # The coordinator of a forming round and rank 0 of the running one check everyone;
            # other members check rank 0, waiting nodes the coordinator they wait for.
            everyone = coordinating or rank == 0
            targets = {i for ids in self._waited_for.values() for i in ids}
            if rank is not None and sealed is not None:
                targets.add(sealed.ids[0])
        if everyone:
            ids = [i for i in conn.get(keys.ids).decode().split() if i != me]
        else:
            ids = sorted(targets - {me})
        if not ids:
            return
        counters = conn.multi_get([keys.heartbeat(i) for i in ids])
        now = time.monotonic()
        dead: list[tuple[str, bytes]] = []
        with self._lock:
            for node_id, counter in zip(ids, counters, strict=True):
                known = self._counters.get(node_id)
                if counter == b"0":
                    self._counters.pop(node_id, None)  # left, or already declared dead
                elif known is None or known[0] != counter:
                    self._counters[node_id] = (counter, now)
                elif now - known[1] >= self._lease_ttl:
                    dead.append((node_id, counter))
        for node_id, counter in dead:
            if conn.compare_set(keys.heartbeat(node_id), counter, "0") != b"0":
                continue  # it beat meanwhile, or another checker got there first
            with self._lock:
                self._counters.pop(node_id, None)
            log.info("rendezvous %s: node %s missed its heartbeats for %g s; removing it",
                     self._run_id, node_id, self._lease_ttl)
            remove(node_id)

    def stop(self, conn: StoreConnection, keys: C10dLayout) -> None:
        """This node leaves: its counter reads "0", so that checkers skip it."""
        if self._node_id is not None:
            conn.set(keys.heartbeat(self._node_id), "0")

    def notice_time(self) -> float:
        # A counter is checked every lease_ttl/3 and declared dead once it has not moved for
        # lease_ttl: up to 5/3 lease_ttl after the last beat, plus the feed's delivery.
        return self._lease_ttl * 5 / 3 + 1.0


class NoHeartbeats:
    """No liveness (the static backend): no counters, no checks, a dead node is not noticed."""

    capabilities: frozenset[str] = frozenset()

    def restart(self) -> None:
        pass

    def start(self, conn: StoreConnection, keys: C10dLayout, node_id: str) -> None:
        pass

    def beat(self, conn: StoreConnection, keys: C10dLayout) -> bool:
        return True

    def note_sealed(self, sealed: RoundRecord) -> None:
        pass

    def wait_for(self, feed: object, coordinators: frozenset[str]) -> None:
        pass

    def forget(self, feed: object) -> None:
        pass

    def check(
        self, conn: StoreConnection, keys: C10dLayout, *, coordinating: bool, remove: Callable[[str], None]
    ) -> None:
        pass

    def stop(self, conn: StoreConnection, keys: C10dLayout) -> None:
        pass

    def notice_time(self) -> float:
        return 0.0


Liveness = Heartbeats | NoHeartbeats
