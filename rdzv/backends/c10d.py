"""The c10d backend: the same rendezvous algorithm over torch's TCPStore, served by one node.

**Single point of failure.** The store lives in the memory of the process that hosts it (the
agent on the node named by the endpoint, or with ``is_host=true``). If that process dies, every
other node fails with `RendezvousConnectionError` naming the endpoint and the job cannot
re-form; the same is true of torch's own c10d backend. The etcd backends keep the state in a
replicated etcd cluster and survive the loss of any node: use them where that matters.

Key layout under ``<prefix>/<run_id>/`` (a multi-tenant store may serve several runs)::

    gen                      generation; bumped by the last node out so a reused run id
                             starts afresh (TCPStore cannot delete by prefix)
    <gen>/state              state document: sealed round + closed flag (compare_set)
    <gen>/claim/<round>      "<node id>[\\t<last call deadline>]" of the round's coordinator,
                             "" once released (compare_set "" -> id claims it)
    <gen>/node/<node id>     "<arrival> <NodeInfo JSON>", "" once the node is gone
    <gen>/hb/<node id>       heartbeat counter, "0" once the node left or was declared dead
    <gen>/ids                every node id that announced (append), to list nodes
    <gen>/arrivals           counter giving each announce its arrival order
    <gen>/log/all, log/ctl   ordered change logs (c10d_store.ChangeLog) naming changed keys
    <gen>/store/<round>/...  the round's torch Store (a PrefixStore)

What the emulation costs, compared with etcd v3:

* Watches: every change appends the name of the changed key to a log (2 ops: reserve a slot
  with `add`, fill it with `compare_set`); control changes go to a second, short log too, so
  nodes that only wait for the seal read a handful of entries instead of every announce. A
  reader blocks with `wait` on the next slot on its own connection, then reads the entries
  and the current values of the named keys in two `multi_get`s, whatever the batch size.
  A cursor is the two log positions packed into one int (all << 32 | ctl).
* Liveness: no leases, so heartbeats. Each node bumps its counter every lease_ttl/3 (one
  `add`); a counter that has not moved for lease_ttl marks its node dead. Checking is done by
  a few, not all: the coordinator of a forming round and rank 0 of the running round read
  every counter with one `multi_get` per interval; waiting nodes check the coordinator they
  wait for and members check rank 0 (one `get` each). The checker that wins the
  `compare_set(counter, seen, "0")` removes the node's record and claim and logs it, as an
  expired lease would. A node whose counter was reset sees it at its next bump and re-joins.
  Detection takes lease_ttl to lease_ttl + lease_ttl/3.
* announce is ~6 operations (v3: one transaction); listing nodes is 2 `multi_get`s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from datetime import timedelta

from torch.distributed import PrefixStore, Store, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousParameters,
)

from rdzv.backends.c10d_store import (
    ChangeLog,
    LogReader,
    OpCounts,
    StoreConnection,
    connect_store,
    names_this_machine,
    serve_store,
)
from rdzv.backends.common import Change, PumpedFeed, Ticker, apply_state, encode_state
from rdzv.rendezvous.backend import ELASTIC, LIVENESS, SPARES, NodeChange
from rdzv.rendezvous.handler import RdzvHandler
from rdzv.rendezvous.model import (
    Control,
    NodeEntry,
    NodeInfo,
    RoundRecord,
    guard,
    node_entry,
    not_a_node,
    parse_node_id,
    parse_number,
    parse_round_no,
)
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings, parse_settings

log = logging.getLogger("rdzv")

DEFAULT_PORT = 29400
ROUND_STORE_TIMEOUT = 300.0
# A feed's reader blocks this long per wait. Nothing relies on the wait ending (close wakes
# it, holes are mended by the ticker); it only bounds how long a forgotten reader lingers.
READ_WAIT = 3600.0

SPOF_HINT = (
    ". The c10d store lives in the process of the node that hosts it; without it the "
    "rendezvous cannot go on (the etcd backends have no such single point of failure)."
)


def pack_cursor(all_pos: int, ctl_pos: int) -> int:
    return (all_pos << 32) | ctl_pos


def unpack_cursor(cursor: int) -> tuple[int, int]:
    return cursor >> 32, cursor & 0xFFFFFFFF


class StoreKeys:
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

    @staticmethod
    def claim(round_no: int) -> str:
        return f"claim/{round_no}"

    @staticmethod
    def node(node_id: str) -> str:
        return f"node/{node_id}"

    def hb(self, node_id: str) -> str:
        return f"{self.base}hb/{node_id}"

    def store(self, round_no: int) -> str:
        return f"{self.base}store/{round_no}/"


class C10dBackend:
    """`RendezvousBackend` over a TCPStore (see the module docstring for what it costs)."""

    name = "c10d"
    capabilities = frozenset({ELASTIC, SPARES, LIVENESS})  # not DURABLE: one node hosts it

    def __init__(
        self,
        settings: RendezvousSettings,
        opener: Callable[[OpCounts], StoreConnection],
        *,
        where: str,
    ) -> None:
        self.settings = settings
        self.where = where
        self.counts = OpCounts()  # store operations of this node, for cost reports
        self._opener = opener
        self._conn: StoreConnection | None = None
        self._keys: StoreKeys | None = None
        self._open_lock = threading.Lock()
        self._lock = threading.Lock()
        self._spare_conns: list[StoreConnection] = []  # for feeds; a connect may be slow
        self._round_conn: StoreConnection | None = None  # the agent's round stores, reused
        self._node_id: str | None = None
        self._registered = False  # our id is in <gen>/ids
        self._record = False  # our node record is present (not a tombstone)
        self._claim: int | None = None  # round we coordinate
        self._hb_last: int | None = None  # our heartbeat counter, None until the first announce
        self._lost = False
        self._pulse: int | None = None
        self._roles: dict[object, frozenset[str]] = {}  # coordinators waited for, per feed
        self._sealed: RoundRecord | None = None  # latest sealed round seen: who checks whom
        self._readers: set[LogReader] = set()  # open feeds' readers, mended by the ticker
        self._seen: dict[str, tuple[bytes, float]] = {}  # node id -> (counter, since when)
        self._last_warning = 0.0

    def describe(self) -> str:
        return self.where

    # ------------------------------------------------------------------ connection
    @property
    def conn(self) -> StoreConnection:
        if self._conn is None:
            with self._open_lock:
                if self._conn is None:
                    conn = self._opener(self.counts)
                    self._keys = self._prepare(conn)
                    # The connection the first feed blocks on, opened now so that forming a
                    # round opens none (each new connection costs the server a name lookup).
                    self._spare_conns.append(conn.clone())
                    self._conn = conn
                    self._pulse = Ticker.shared().add(self.settings.lease_ttl / 3, self._beat)
        return self._conn

    @property
    def keys(self) -> StoreKeys:
        if self._keys is None:
            _ = self.conn
        assert self._keys is not None
        return self._keys

    def _prepare(self, conn: StoreConnection) -> StoreKeys:
        """Create the keys readers `get` (a get of a missing key would block)."""
        keys = StoreKeys(self.settings.run_prefix, conn.add(f"{self.settings.run_prefix}/gen", 0))
        conn.compare_set(keys.state, "", encode_state(None, closed=False))
        conn.append(keys.ids, "")
        conn.add(keys.all.seq, 0)
        conn.add(keys.ctl.seq, 0)
        return keys

    def _borrow(self) -> StoreConnection:
        with self._lock:
            if self._spare_conns:
                return self._spare_conns.pop()
        return self.conn.clone()

    def _give_back(self, conn: StoreConnection) -> None:
        with self._lock:
            self._spare_conns.append(conn)

    def _log(self, name: str, *, control: bool) -> None:
        """Record that key `name` changed (its value is already written)."""
        if control:
            self.keys.ctl.append(self.conn, name)
        self.keys.all.append(self.conn, name)

    def _position(self, *extra: str) -> tuple[int, list[bytes]]:
        """The log positions (a cursor) and `extra` keys, read in one atomic multi_get."""
        keys = self.keys
        values = self.conn.multi_get([keys.all.seq, keys.ctl.seq, *extra])
        return pack_cursor(int(values[0]), int(values[1])), values[2:]

    # ------------------------------------------------------------------ liveness
    def open_session(self) -> None:
        with self._lock:
            self._lost = False
            self._hb_last = None  # a new incarnation starts with the next announce
            self._claim = None  # a claim is (re)made, and logged, by the next announce

    def session_lost(self) -> bool:
        return self._lost

    def _start_heartbeat(self, node_id: str) -> None:
        with self._lock:
            if self._hb_last is not None or LIVENESS not in self.capabilities:
                return
        value = self.conn.add(self.keys.hb(node_id), 1)
        with self._lock:
            self._hb_last = value

    def _beat(self) -> None:
        """Ticker task: bump our counter, check the heartbeats we are responsible for, and
        mend log holes our readers are stuck on."""
        try:
            with self._lock:
                readers = list(self._readers)
            for reader in readers:
                reader.mend(self.conn, self.settings.lease_ttl)
            with self._lock:
                node_id, last = self._node_id, self._hb_last
            if node_id is not None and last is not None and not self._lost:
                value = self.conn.add(self.keys.hb(node_id), 1)
                with self._lock:
                    if value <= last:  # a checker reset it: we were declared dead
                        self._lost, self._claim = True, None
                        log.warning("rendezvous %s: this node was declared dead (missed heartbeats)",
                                    self.settings.run_id)
                    else:
                        self._hb_last = value
            if LIVENESS in self.capabilities:
                self._check_heartbeats()
        except RendezvousConnectionError as exc:
            now = time.monotonic()
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("rendezvous %s: heartbeat failed: %s", self.settings.run_id, exc)

    def _check_heartbeats(self) -> None:
        keys, conn = self.keys, self.conn
        with self._lock:
            me, sealed = self._node_id, self._sealed
            rank = sealed.rank_of(me) if sealed is not None and me is not None else None
            # The coordinator of a forming round and rank 0 of the running one check everyone;
            # other members check rank 0, waiting nodes the coordinator they wait for.
            everyone = self._claim is not None or rank == 0
            targets = {i for r in self._roles.values() for i in r}
            if rank is not None and sealed is not None:
                targets.add(sealed.ids[0])
        if everyone:
            ids = [i for i in conn.get(keys.ids).decode().split() if i != me]
        else:
            ids = sorted(targets - {me})
        if not ids:
            return
        counters = conn.multi_get([keys.hb(i) for i in ids])
        now = time.monotonic()
        dead: list[tuple[str, bytes]] = []
        with self._lock:
            for node_id, counter in zip(ids, counters, strict=True):
                seen = self._seen.get(node_id)
                if counter == b"0":
                    self._seen.pop(node_id, None)  # left, or already declared dead
                elif seen is None or seen[0] != counter:
                    self._seen[node_id] = (counter, now)
                elif now - seen[1] >= self.settings.lease_ttl:
                    dead.append((node_id, counter))
        for node_id, counter in dead:
            self._declare_dead(node_id, counter)

    def _declare_dead(self, node_id: str, counter: bytes) -> None:
        """What an expiring lease does in etcd: remove the node's record and its claim."""
        keys, conn = self.keys, self.conn
        if conn.compare_set(keys.hb(node_id), counter, "0") != b"0":
            return  # it beat meanwhile, or another checker got there first
        self._seen.pop(node_id, None)
        log.info("rendezvous %s: node %s missed its heartbeats for %g s; removing it",
                 self.settings.run_id, node_id, self.settings.lease_ttl)
        name = keys.node(node_id)
        raw = conn.get(keys.full(name))
        if raw:
            conn.set(keys.full(name), "")
            self._log(name, control=False)
            change = self.decode(name, raw)
            if isinstance(change, NodeChange) and change.entry is not None:
                self._release(change.entry.info.want, node_id)

    def _release(self, round_no: int, holder: str) -> None:
        """Free round `round_no`'s claim if `holder` holds it."""
        keys, conn = self.keys, self.conn
        name = keys.claim(round_no)
        if not conn.check([keys.full(name)]):
            return
        raw = conn.get(keys.full(name))
        if _holder(raw) == holder and conn.compare_set(keys.full(name), raw, "") == b"":
            self._log(name, control=True)

    # ------------------------------------------------------------------ control state
    def decode(self, name: str, raw: bytes) -> Change:
        """A changed key's current value as a feed change (never raises: a node record that
        does not decode is not a node, a control record that does not is noted in control)."""
        if name.startswith("node/"):
            node_id = name[len("node/") :]
            if not raw:
                return NodeChange(node_id, None)
            arrival, _, info = raw.partition(b" ")
            if not arrival.isdigit():
                not_a_node(self.keys.full(name), "no arrival number before the record")
                return NodeChange(node_id, None)
            return NodeChange(node_id, node_entry(self.keys.full(name), node_id, info, int(arrival)))
        if name.startswith("claim/"):
            return lambda control: _apply_claim(control, self.keys.full(name), raw)
        return lambda control: self._apply_state(control, raw)

    def _apply_state(self, control: Control, raw: bytes) -> None:
        apply_state(control, raw.decode(errors="replace"), self.keys.state)
        with self._lock:
            if control.sealed is not None and (self._sealed is None or control.sealed.round >= self._sealed.round):
                self._sealed = control.sealed

    def read_control(self) -> tuple[Control, int]:
        cursor, (state,) = self._position(self.keys.state)
        control = Control()
        self._apply_state(control, state)
        # A forming round is always the one after the sealed one: its claim is all we need.
        claim = self.keys.full(self.keys.claim(control.round + 1))
        if self.conn.check([claim]):
            _apply_claim(control, claim, self.conn.get(claim))
        return control, cursor

    def announce(self, node: NodeInfo, control: Control) -> tuple[str | None, int]:
        keys, conn = self.keys, self.conn
        with self._lock:
            self._node_id = node.node_id
        self._start_heartbeat(node.node_id)
        arrival = conn.add(keys.arrivals, 1)
        conn.set(keys.full(keys.node(node.node_id)), f"{arrival} {node.encode().decode()}")
        self._record = True
        if not self._registered:  # after the record: every listed id has a record to read
            conn.append(keys.ids, node.node_id + "\n")
            self._registered = True
        self._log(keys.node(node.node_id), control=False)
        name = keys.claim(node.want)
        holder = _holder(conn.compare_set(keys.full(name), "", node.node_id))
        claimed_now = holder == node.node_id and self._claim != node.want
        if claimed_now:
            self._log(name, control=True)
        cursor, (state,) = self._position(keys.state)
        now = Control()
        self._apply_state(now, state)
        if now.corrupt or now.closed or now.token != control.token:
            if claimed_now:  # made against a stale view: withdraw it
                self._release(node.want, node.node_id)
            return None, cursor
        with self._lock:
            self._claim = node.want if holder == node.node_id else None
        return holder, cursor

    def read_nodes(self) -> tuple[dict[str, NodeEntry], int]:
        keys = self.keys
        cursor, (ids,) = self._position(keys.ids)
        nodes: dict[str, NodeEntry] = {}
        node_ids = ids.decode().split()
        for node_id, raw in zip(node_ids, self.conn.multi_get(
            [keys.full(keys.node(i)) for i in node_ids]
        ), strict=True):
            change = self.decode(keys.node(node_id), raw)
            if isinstance(change, NodeChange) and change.entry is not None:
                nodes[node_id] = change.entry
        return nodes, cursor

    def count_nodes(self) -> int:
        return len(self.read_nodes()[0])

    def watch(
        self, after: int, control: Control, *, nodes: bool, known: Collection[str] = ()
    ) -> PumpedFeed:
        # `known` is not needed: the change logs are never truncated, a reader never resyncs.
        keys = self.keys
        all_pos, ctl_pos = unpack_cursor(after)
        conn = self._borrow()
        reader = LogReader(keys.all if nodes else keys.ctl, conn, all_pos if nodes else ctl_pos)

        def fetch(wait: float) -> list[Change] | None:
            names = reader.read(wait)
            if not names:
                return None
            unique = list(dict.fromkeys(names))
            values = conn.multi_get([keys.full(n) for n in unique])
            return [self.decode(n, v) for n, v in zip(unique, values, strict=True)]

        with self._lock:
            self._readers.add(reader)
            if not nodes and LIVENESS in self.capabilities:
                # Waiting for a seal: the coordinator must stay alive to make it.
                self._roles[reader] = frozenset(c for c in control.coordinators.values() if c != self._node_id)

        def close() -> None:
            with self._lock:
                self._roles.pop(reader, None)
            with contextlib.suppress(RendezvousConnectionError):
                reader.wake(self.conn)

        def exit_() -> None:
            with self._lock:
                self._readers.discard(reader)
            self._give_back(conn)

        return PumpedFeed(
            control,
            fetch,
            wait=READ_WAIT,
            name=f"rdzv-c10d-watch-{self.settings.run_id}",
            on_close=close,
            on_exit=exit_,
        )

    def seal(self, control: Control, record: RoundRecord, coordinator: str) -> RoundRecord | None:
        keys, conn = self.keys, self.conn
        # Members watch from just before the seal, so nothing after it can be missed.
        cursor, (claim,) = self._position(keys.full(keys.claim(record.round)))
        if _holder(claim) != coordinator:
            return None
        sealed = RoundRecord.decode(record.encode(), cursor)
        doc = encode_state(sealed, closed=False)
        if conn.compare_set(keys.state, str(control.token or ""), doc) != doc.encode():
            return None
        self._log("state", control=True)
        with self._lock:
            self._claim = None
            self._sealed = sealed
        return sealed

    def publish_last_call(self, round_no: int, deadline: float) -> None:
        keys, conn = self.keys, self.conn
        name = keys.claim(round_no)
        raw = conn.get(keys.full(name))
        holder = _holder(raw)
        new = f"{holder}\t{deadline!r}"
        if holder and conn.compare_set(keys.full(name), raw, new) == new.encode():
            self._log(name, control=True)

    def retract(self, node_id: str, round_no: int) -> None:
        with contextlib.suppress(RendezvousConnectionError):
            self._release(round_no, node_id)
            self._tombstone(node_id)
        with self._lock:
            self._claim = None

    def _tombstone(self, node_id: str) -> None:
        if self._record:
            name = self.keys.node(node_id)
            self.conn.set(self.keys.full(name), "")
            self._record = False
            self._log(name, control=False)

    def close_run(self) -> None:
        keys, conn = self.keys, self.conn
        while True:
            raw = conn.get(keys.state)
            control = Control()
            self._apply_state(control, raw)
            # A document that does not decode is replaced by a closed one: the run is ending.
            if control.closed and not control.corrupt:
                return
            doc = encode_state(control.sealed, closed=True)
            if conn.compare_set(keys.state, raw, doc) == doc.encode():
                self._log("state", control=True)
                return

    def withdraw(self) -> None:
        """Stop beating, remove our record and claim: the others see us gone now."""
        with self._lock:
            Ticker.shared().remove(self._pulse)
            self._pulse = None
            node_id, claim = self._node_id, self._claim
            self._claim = None
            self._lost = True  # no heartbeats from here on: we are no member any more
        if self._conn is None or node_id is None:
            return
        if claim is not None:
            self._release(claim, node_id)
        self._tombstone(node_id)
        self.conn.set(self.keys.hb(node_id), "0")  # so that checkers skip us

    def leave(self) -> None:
        """Stop beating, remove our record; the last node out starts a new generation."""
        try:
            self.withdraw()
            if self._conn is not None and self._node_id is not None and not self.read_nodes()[0]:
                self.conn.add(self.keys.gen_counter, 1)
        except RendezvousConnectionError as exc:
            # Typically the hosting node is gone already: nothing left to clean up.
            log.info("rendezvous %s: leaving without cleanup: %s", self.settings.run_id, exc)
        finally:
            with self._lock:
                self._spare_conns.clear()

    def notice_time(self) -> float:
        if LIVENESS not in self.capabilities:
            return 0.0
        # A counter is checked every lease_ttl/3 and declared dead once it has not moved for
        # lease_ttl: up to 5/3 lease_ttl after the last beat, plus the feed's delivery.
        return self.settings.lease_ttl * 5 / 3 + 1.0

    def round_store(self, record: RoundRecord) -> Store:
        return RoundStore(lambda: PrefixStore(self.keys.store(record.round), self._agent_store()))

    def clean_hint(self) -> str:
        return f"restart the node that serves the store ({self.where}): the run's state lives only in that process"

    def expiry(self) -> float | None:
        return None  # the store's keys never expire; the last node out starts a new generation

    def _agent_store(self) -> TCPStore:
        # Its own connection: the agent blocks on it (barriers) without holding up ours.
        with self._lock:
            if self._round_conn is None:
                self._round_conn = self.conn.clone()
                self._round_conn.store.set_timeout(timedelta(seconds=ROUND_STORE_TIMEOUT))
            return self._round_conn.store


class RoundStore(Store):
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


def _holder(raw: bytes) -> str:
    """Who holds a claim ("" when released); a claim that is not text names nobody we know."""
    return raw.decode(errors="replace").partition("\t")[0]


def _apply_claim(control: Control, key: str, raw: bytes) -> None:
    """A claim value "<holder>[\t<last call deadline>]" at `key` (".../claim/<round>")."""
    with guard(control, key):
        round_no = parse_round_no(key.rpartition("/")[2])
        holder, _, deadline = raw.decode(errors="replace").partition("\t")
        if not holder:
            control.coordinators.pop(round_no, None)
            control.last_call.pop(round_no, None)
            return
        holder = parse_node_id(holder)
        when = parse_number(deadline, "last call deadline") if deadline else None
        control.coordinators[round_no] = holder
        if when is not None:
            control.last_call[round_no] = when


def _flag(settings: RendezvousSettings, name: str) -> bool | None:
    raw = settings.extra.get(name)
    if raw is None or raw == "":
        return None
    text = str(raw).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ConfigError(f"rendezvous setting {name}={raw!r} is not a boolean")


def single_endpoint(settings: RendezvousSettings, backend: str) -> tuple[str, int]:
    if len(settings.endpoints) != 1:
        raise ConfigError(f"the {backend} backend takes one HOST:PORT endpoint, got {','.join(settings.endpoints)}")
    if settings.tls or settings.user:
        raise ConfigError(
            f"the {backend} backend has no TLS or authentication (TCPStore offers neither); "
            "use the etcd backend for that"
        )
    host, _, port = settings.endpoints[0].rpartition(":")
    return host, int(port)


def open_c10d(settings: RendezvousSettings) -> tuple[Callable[[OpCounts], StoreConnection], str]:
    """torch's rules for who serves the store: `is_host` if given, else the node whose host name
    or address is the endpoint's (port 0: this node, for single-node runs). A node that would
    host but finds the port taken (another agent on this machine got there first) connects."""
    host, port = single_endpoint(settings, "c10d")
    hosting = _flag(settings, "is_host")
    if hosting is None:
        hosting = port == 0 or names_this_machine(host)
    if hosting:
        try:
            store = serve_store(port, settings.read_timeout)
        except RuntimeError as exc:
            if _flag(settings, "is_host"):
                raise RendezvousConnectionError(
                    f"c10d: cannot serve the store on port {port} (is_host=true): {exc}"
                ) from exc
            log.info("c10d store port %d is taken on this machine; connecting to it instead", port)
        else:
            where = f"c10d store {host}:{store.port} (served by this node)"
            return _ready(store, where), where
    if port == 0:
        raise ConfigError("c10d endpoint port 0 means 'pick a free port' and works only on the node that hosts the store")
    where = f"c10d store {host}:{port}"
    store = connect_store(
        host, port, settings.read_timeout, where=where,
        advice="Is the node that serves it running? (read_timeout bounds the connect)",
    )
    return _ready(store, where), where


def _ready(store: TCPStore, where: str) -> Callable[[OpCounts], StoreConnection]:
    return lambda counts: StoreConnection(store, where, counts, hint=SPOF_HINT)


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Creator for `--rdzv-backend=c10d` (rdzv-launch) and `rdzv-c10d` (torchrun)."""
    settings = parse_settings(params, default_port=DEFAULT_PORT)
    opener, where = open_c10d(settings)
    backend = C10dBackend(settings, opener, where=where)
    _ = backend.conn  # set the run's keys up now: a broken store fails here, not mid-join
    handler = RdzvHandler(settings, backend)
    backend.open_session()
    return handler
