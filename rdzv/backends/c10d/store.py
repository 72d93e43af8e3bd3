"""torch's TCPStore as a rendezvous store: serving and connecting, connections whose every
operation is bounded, counted and fails with a message naming the endpoint, an ordered change
log, and where the c10d backend keeps a run's keys (`C10dLayout`).

TCPStore gives per-key `set`/`get`/`add`/`compare_set`/`append`, `check`, `multi_get` and a
blocking `wait` for keys to appear. It has no transactions, no key listing by prefix, no TTLs
and no watch, and `get` of a missing key blocks until the store timeout; so readers here only
`get` keys known to exist and wait with `wait(keys, timeout)`, always with an explicit timeout.
A blocking `wait` also holds its connection (ops on one TCPStore client are serialised), which
is why each blocking reader gets its own connection (`clone`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from torch.distributed import DistStoreError, TCPStore
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import StoreBusyError

log = logging.getLogger("rdzv")

HOLE = "-"  # fills a log slot whose writer died between reserving and writing it
# TCPStore names each new socket's peer with getnameinfo, a reverse DNS lookup; where DNS does
# not answer (seen in sandboxes: 3% of connects stalled 5 s) a connect can time out although the
# store is fine. A timed-out connect to a port that does accept connections is retried once.
CONNECT_TRIES = 2


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host.strip("[]"), port), timeout=2.0).close()
        return True
    except OSError:
        return False


def _within(seconds: float, make: Callable[[], TCPStore]) -> TCPStore:
    """`make()`, given up after `seconds`: a TCPStore client whose server accepts the
    connection but does not answer (its process frozen) waits in its handshake without any
    deadline of its own. The abandoned attempt ends when the server answers or goes away."""
    made: list[TCPStore] = []
    failed: list[BaseException] = []

    def attempt() -> None:
        try:
            made.append(make())
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)

    thread = threading.Thread(target=attempt, name="rdzv-c10d-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if failed:
        raise failed[0]
    if not made:
        raise RuntimeError(f"connect timed out: no answer within {seconds:g} s")
    return made[0]


def _connect(make: Callable[[], TCPStore], what: str, host: str, port: int) -> TCPStore:
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            return make()
        except RuntimeError as exc:
            stalled = "timed out" in str(exc) and _listening(host, port)
            if attempt == CONNECT_TRIES or not stalled:
                raise
            log.info("%s: connect timed out (attempt %d of %d); retrying", what, attempt, CONNECT_TRIES)
    raise AssertionError("unreachable")


@dataclass
class OpCounts:
    """Store operations issued by one backend (all its connections), for cost reports."""

    reads: int = 0
    writes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, write: bool) -> None:
        with self._lock:
            if write:
                self.writes += 1
            else:
                self.reads += 1


_WRITES = {"set", "compare_set", "append", "delete_key", "multi_set"}


class StoreConnection:
    """One TCPStore client connection with bounded, counted, translated operations."""

    def __init__(self, store: TCPStore, where: str, counts: OpCounts, *, hint: str = "") -> None:
        self.store = store
        self.where = where  # e.g. "c10d store 10.0.0.1:29400", for messages
        self.counts = counts
        self.hint = hint  # appended to connection errors: what losing this store means

    def _op(self, name: str, *args: object) -> object:
        write = name in _WRITES or (name == "add" and args[1] != 0)
        self.counts.count(write)
        try:
            return getattr(self.store, name)(*args)
        except RuntimeError as exc:  # DistNetworkError, DistStoreError (a stuck server), ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RendezvousConnectionError(f"{self.where}: {name} failed: {first}{self.hint}") from exc

    def set(self, key: str, value: str | bytes) -> None:
        self._op("set", key, value)

    def get(self, key: str) -> bytes:
        """Only for keys known to exist: TCPStore's get of a missing key blocks."""
        return self._op("get", key)  # type: ignore[return-value]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if not keys:
            return []
        return self._op("multi_get", keys)  # type: ignore[return-value]

    def add(self, key: str, amount: int) -> int:
        return int(self._op("add", key, amount))  # type: ignore[call-overload]

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        return self._op("compare_set", key, expected, desired)  # type: ignore[return-value]

    def append(self, key: str, value: str) -> None:
        self._op("append", key, value)

    def check(self, keys: list[str]) -> bool:
        return bool(self._op("check", keys))

    def wait(self, keys: list[str], timeout: float) -> bool:
        """Block until every key exists (True) or `timeout` s passed (False)."""
        self.counts.count(False)
        try:
            self.store.wait(keys, timedelta(seconds=max(timeout, 0.001)))
            return True
        except DistStoreError as exc:
            if "timeout" in str(exc).lower() or "timed out" in str(exc).lower():
                return False
            raise RendezvousConnectionError(f"{self.where}: wait failed: {exc}{self.hint}") from exc
        except RuntimeError as exc:
            raise RendezvousConnectionError(f"{self.where}: wait failed: {exc}{self.hint}") from exc

    def clone(self) -> StoreConnection:
        """A second connection to the same server, for a reader that blocks."""
        try:
            twin = _connect(self.store.clone, self.where, "localhost", self.store.port)
        except RuntimeError as exc:
            raise RendezvousConnectionError(f"{self.where}: cannot connect: {exc}{self.hint}") from exc
        return StoreConnection(twin, self.where, self.counts, hint=self.hint)


def serve_store(port: int, timeout: float) -> TCPStore:
    """Host the store here (multi-tenant: a second host in this process shares the server)."""
    return _connect(
        lambda: TCPStore(
            "localhost",
            port,
            is_master=True,
            multi_tenant=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
        ),
        f"store port {port}",
        "localhost",
        port,
    )


def connect_store(host: str, port: int, timeout: float, *, where: str, advice: str) -> TCPStore:
    """Connect to a store served elsewhere; TCPStore retries the connect until `timeout`.
    A failure says where, how long we tried and what to check (`advice`)."""
    try:
        return _connect(
            # TCPStore retries a refused connect until `timeout`; one more second to report it.
            lambda: _within(
                timeout + 1.0,
                lambda: TCPStore(host.strip("[]"), port, is_master=False, timeout=timedelta(seconds=timeout)),
            ),
            where,
            host,
            port,
        )
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "timed out" in str(exc) and _listening(host, port):
            # Accepting connections but not answering (its host stalled): worth waiting for.
            raise StoreBusyError(f"{where}: accepts connections but did not answer within {timeout:g} s") from exc
        raise RendezvousConnectionError(
            f"{where}: cannot connect within {timeout:g} s: {first}. {advice}"
        ) from exc


class ChangeLog:
    """An append-only log in the store: a counter `<name>/seq` and entries `<name>/<n>`.

    Appending reserves a slot with `add` and fills it with `compare_set(slot, "", entry)`: two
    operations and no read-modify-write race. A slot can also be filled with HOLE by anyone:
    by a reader whose writer died between the two steps (`LogReader.mend`), or to wake a reader
    blocked on a slot nobody reserved yet (`LogReader.wake`). A writer that finds its slot
    taken appends again, and readers skip HOLEs, so neither loses or reorders an entry.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = f"{name}/seq"

    def slot(self, n: int) -> str:
        return f"{self.name}/{n}"

    def append(self, conn: StoreConnection, entry: str) -> int:
        while True:
            n = conn.add(self.seq, 1)
            if conn.compare_set(self.slot(n), "", entry) == entry.encode():
                return n


class LogReader:
    """Reads a `ChangeLog` from position `after`, in batches, on its own connection.

    It blocks on the next slot with one long `wait` (TCPStore logs a warning for every wait
    that times out, so timeouts are not the way to notice anything): `wake` ends the wait,
    `mend` repairs a hole, both from another connection.
    """

    def __init__(self, log_: ChangeLog, conn: StoreConnection, after: int) -> None:
        self.log = log_
        self.conn = conn
        self.next = after + 1
        self._waiting = False
        self._stopped = False
        self._hole: tuple[int, float] | None = None  # (slot, first seen reserved and empty)

    def read(self, wait: float) -> list[str] | None:
        """Entries after the last batch; None when none came within `wait` s."""
        self._waiting = True
        try:
            # Checked after publishing `_waiting`: `wake` either stops us here or fills the
            # very slot we are about to wait on (`next` only moves in this thread).
            if self._stopped or not self.conn.wait([self.log.slot(self.next)], wait):
                return None
        finally:
            self._waiting = False
        if self._stopped:
            return None
        head = self.conn.add(self.log.seq, 0)  # slots up to head are reserved (add: never blocks)
        slots = [self.log.slot(n) for n in range(self.next, max(head, self.next) + 1)]
        # Reserved slots are written an instant later; if one lags, take only the first now.
        if len(slots) > 1 and not self.conn.check(slots):
            slots = slots[:1]
        entries = [raw.decode() for raw in self.conn.multi_get(slots)]
        self.next += len(slots)
        return [e for e in entries if e != HOLE]

    def wake(self, conn: StoreConnection) -> None:
        """End a blocked `read` for good (it returns None from now on)."""
        self._stopped = True
        if self._waiting:
            conn.compare_set(self.log.slot(self.next), "", HOLE)

    def mend(self, conn: StoreConnection, grace: float) -> None:
        """Skip the slot this reader waits on if it was reserved `grace` s ago and is still
        empty: its writer died between reserving and writing it."""
        n = self.next
        if not self._waiting or conn.add(self.log.seq, 0) < n:
            self._hole = None  # not blocked on a reserved slot
            return
        now = time.monotonic()
        if self._hole is None or self._hole[0] != n:
            self._hole = (n, now)
        elif now - self._hole[1] >= grace:
            slot = self.log.slot(n)
            if conn.compare_set(slot, "", HOLE) == HOLE.encode():
                log.warning("%s: log slot %s was reserved but never written; skipped", conn.where, slot)


class C10dLayout:
    """The c10d backend's keys under ``<prefix>/<run_id>/`` (a multi-tenant store may serve
    several runs)::

        gen                      generation; bumped by the last node out so a reused run id
                                 starts afresh (TCPStore cannot delete by prefix)
        <gen>/state              state document: sealed round + closed flag (compare_set)
        <gen>/claim/<round>      "<node id>[\\t<last call deadline>]" of the round's
                                 coordinator, "" once released (compare_set "" -> id claims it)
        <gen>/node/<node id>     "<arrival> <NodeInfo JSON>", "" once the node is gone
        <gen>/hb/<node id>       heartbeat counter, "0" once the node left or was declared dead
        <gen>/ids                every node id that announced (append), to list nodes
        <gen>/arrivals           counter giving each announce its arrival order
        <gen>/log/all, log/ctl   ordered change logs (`ChangeLog`) naming changed keys
        <gen>/store/<round>/...  the round's torch Store (a PrefixStore)

    Change logs name keys relative to ``<gen>/`` (`claim/<round>`, `node/<id>`, `state`).
    """

    CLAIM = "claim/"
    NODE = "node/"

    def __init__(self, run_prefix: str, gen: int) -> None:
        self.gen_counter = f"{run_prefix}/gen"
        base = f"{run_prefix}/{gen}/"
        self.base = base
        self.state = base + "state"
        self.ids = base + "ids"
        self.arrivals = base + "arrivals"
        self.all = ChangeLog(base + "log/all")
        self.ctl = ChangeLog(base + "log/ctl")

    def full(self, name: str) -> str:
        return self.base + name

    def claim(self, round_no: int) -> str:
        return f"{self.CLAIM}{round_no}"

    def node(self, node_id: str) -> str:
        return f"{self.NODE}{node_id}"

    def heartbeat(self, node_id: str) -> str:
        return f"{self.base}hb/{node_id}"

    def store(self, round_no: int) -> str:
        return f"{self.base}store/{round_no}/"
