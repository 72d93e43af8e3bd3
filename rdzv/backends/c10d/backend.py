"""The c10d backend: the same rendezvous algorithm over torch's TCPStore, served by one node.

**Single point of failure.** The store lives in the memory of the process that hosts it (see
`c10d_host`). If that process dies, every other node fails with `RendezvousConnectionError`
naming the endpoint and the job cannot re-form, as with torch's own c10d backend.

Keys are laid out by `c10d_store.C10dLayout`. TCPStore has no watch: every change appends the
changed key's name to an ordered log (control changes to a short second log too), and a feed
blocks on the next slot of one (`c10d_store.LogReader`); a cursor is the two log positions
packed into one int. No leases either: liveness comes from the `Liveness` given (heartbeat
counters, `c10d_heartbeat`). Costs are compared with etcd v3 in docs/backends.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection, Mapping

from torch.distributed import PrefixStore, Store
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import ELASTIC, SPARES, NodeChange, departures_from_nodes
from rdzv.backends.c10d.connections import C10dConnections, unpack_cursor
from rdzv.backends.c10d.heartbeat import Heartbeats, Liveness
from rdzv.backends.c10d.host import Opener, open_c10d
from rdzv.backends.c10d.quarantine import NAME as QUARANTINE_KEY
from rdzv.backends.c10d.quarantine import C10dQuarantineBoard
from rdzv.backends.c10d.records import apply_claim, holder_of, node_change
from rdzv.backends.c10d.store import C10dLayout, LogReader, OpCounts, StoreConnection
from rdzv.backends.common.last_out import leave_run
from rdzv.backends.common.lazy_store import LazyStore
from rdzv.backends.common.pumped_feed import Change, PumpedFeed
from rdzv.backends.common.state_document import apply_state, encode_state
from rdzv.backends.common.ticker import Ticker
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundProgress, RoundRecord
from rdzv.rendezvous.settings import RendezvousSettings, config_bool

log = logging.getLogger("rdzv")

# A feed's reader blocks this long per wait. Nothing relies on the wait ending (close wakes
# it, holes are mended by the ticker); it only bounds how long a forgotten reader lingers.
READ_WAIT = 3600.0
GROUP_CAPABILITIES = frozenset({ELASTIC, SPARES})


class C10dBackend:
    """`Backend` over a TCPStore; what it can do beyond a fixed group comes from
    `capabilities` (the group's) and `liveness` (heartbeats, or none)."""

    def __init__(
        self,
        settings: RendezvousSettings,
        opener: Opener,
        *,
        where: str,
        liveness: Liveness,
        name: str = "c10d",
        capabilities: frozenset[str] = GROUP_CAPABILITIES,
    ) -> None:
        self.settings = settings
        self.where = where
        self.name = name
        self.capabilities = capabilities | liveness.capabilities  # never DURABLE: one node hosts it
        self.liveness = liveness
        self.connections = C10dConnections(settings.run_prefix, opener, self._start_ticking)
        self._lock = threading.Lock()
        self._node_id: str | None = None
        self._registered = False  # our id is in <gen>/ids
        self._record = False  # our node record is present (not a tombstone)
        self._claim: int | None = None  # round we coordinate
        self._lost = False
        self._pulse: int | None = None
        self._readers: set[LogReader] = set()  # open feeds' readers, mended by the ticker
        self._last_warning = 0.0

    def describe(self) -> str:
        return self.where

    # ------------------------------------------------------------------ connection
    @property
    def counts(self) -> OpCounts:
        """Store operations of this node, for cost reports."""
        return self.connections.counts

    @property
    def conn(self) -> StoreConnection:
        return self.connections.conn

    @property
    def keys(self) -> C10dLayout:
        return self.connections.keys

    def _start_ticking(self) -> None:
        self._pulse = Ticker.shared().add(self.settings.lease_ttl / 3, self._tick)

    # ------------------------------------------------------------------ liveness
    def open_session(self) -> None:
        with self._lock:
            self._lost = False
            self._claim = None  # a claim is (re)made, and logged, by the next announce
            # A node that withdrew to stand aside (a failed health check) beats again.
            beat_again = self._pulse is None and self.connections.opened
        if beat_again:
            self._start_ticking()
        self.liveness.restart()

    def session_lost(self) -> bool:
        return self._lost

    def _tick(self) -> None:
        """Ticker task: mend log holes our readers are stuck on, beat, check heartbeats."""
        try:
            with self._lock:
                readers = list(self._readers)
            for reader in readers:
                reader.mend(self.conn, self.settings.lease_ttl)
            if not self._lost and not self.liveness.beat(self.conn, self.keys):
                with self._lock:
                    self._lost, self._claim = True, None
                log.warning("rendezvous %s: this node was declared dead (missed heartbeats)",
                            self.settings.run_id)
            self.liveness.check(
                self.conn, self.keys, coordinating=self._claim is not None, remove=self._remove_dead
            )
        except RendezvousConnectionError as exc:
            now = time.monotonic()
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("rendezvous %s: heartbeat failed: %s", self.settings.run_id, exc)

    def _remove_dead(self, node_id: str) -> None:
        """What an expiring lease does in etcd: remove the node's record and its claim."""
        keys, conn = self.keys, self.conn
        name = keys.node(node_id)
        raw = conn.get(keys.full(name))
        if raw:
            conn.set(keys.full(name), "")
            self.connections.log(name, control=False)
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
        if holder_of(raw) == holder and conn.compare_set(keys.full(name), raw, "") == b"":
            self.connections.log(name, control=True)

    # ------------------------------------------------------------------ control state
    def decode(self, name: str, raw: bytes) -> Change:
        """A changed key's current value as a feed change (never raises: a node record that
        does not decode is not a node, a control record that does not is noted in control)."""
        if name.startswith(C10dLayout.NODE):
            return node_change(self.keys.full(name), name[len(C10dLayout.NODE) :], raw)
        if name.startswith(C10dLayout.CLAIM):
            return lambda control: apply_claim(control, self.keys.full(name), raw)
        return lambda control: self._apply_state(control, raw)

    def _apply_state(self, control: Control, raw: bytes) -> None:
        apply_state(control, raw.decode(errors="replace"), self.keys.state)
        if control.sealed is not None:
            self.liveness.note_sealed(control.sealed)

    def read_control(self) -> tuple[Control, int]:
        cursor, (state,) = self.connections.position(self.keys.state)
        control = Control()
        self._apply_state(control, state)
        # A forming round is always the one after the sealed one: its claim is all we need.
        claim = self.keys.full(self.keys.claim(control.round + 1))
        if self.conn.check([claim]):
            apply_claim(control, claim, self.conn.get(claim))
        return control, cursor

    def announce(self, node: NodeInfo, control: Control) -> tuple[str | None, int]:
        keys, conn = self.keys, self.conn
        with self._lock:
            self._node_id = node.node_id
        self.liveness.start(conn, keys, node.node_id)
        arrival = conn.add(keys.arrivals, 1)
        conn.set(keys.full(keys.node(node.node_id)), f"{arrival} {node.encode().decode()}")
        self._record = True
        if not self._registered:  # after the record: every listed id has a record to read
            conn.append(keys.ids, node.node_id + "\n")
            self._registered = True
        self.connections.log(keys.node(node.node_id), control=False)
        name = keys.claim(node.want)
        holder = holder_of(conn.compare_set(keys.full(name), "", node.node_id))
        claimed_now = holder == node.node_id and self._claim != node.want
        if claimed_now:
            self.connections.log(name, control=True)
        cursor, (state,) = self.connections.position(keys.state)
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
        cursor, (ids,) = self.connections.position(keys.ids)
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
        conn = self.connections.borrow()
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
        if not nodes:  # waiting for a seal: the coordinator must stay alive to make it
            self.liveness.wait_for(reader, frozenset(control.coordinators.values()))

        def close() -> None:
            self.liveness.forget(reader)
            with contextlib.suppress(RendezvousConnectionError):
                reader.wake(self.conn)

        def exit_() -> None:
            with self._lock:
                self._readers.discard(reader)
            self.connections.give_back(conn)

        return PumpedFeed(
            control,
            fetch,
            wait=READ_WAIT,
            name=f"rdzv-c10d-watch-{self.settings.run_id}",
            on_close=close,
            on_exit=exit_,
        )

    def watch_round(self, record: RoundRecord) -> PumpedFeed:
        return departures_from_nodes(self, record)

    def seal(
        self,
        control: Control,
        record: RoundRecord,
        entries: Mapping[str, NodeEntry],
        coordinator: str,
        view_cursor: int,
    ) -> RoundRecord | None:
        # `view_cursor` is not needed: members watch from just before the seal, read here.
        keys, conn = self.keys, self.conn
        cursor, (claim,) = self.connections.position(keys.full(keys.claim(record.round)))
        if holder_of(claim) != coordinator:
            return None
        sealed = RoundRecord.decode(record.encode(), cursor)
        doc = encode_state(sealed, closed=False)
        if conn.compare_set(keys.state, str(control.token or ""), doc) != doc.encode():
            return None
        self.connections.log("state", control=True)
        with self._lock:
            self._claim = None
        self.liveness.note_sealed(sealed)
        return sealed

    def publish_last_call(self, round_no: int, deadline: float) -> None:
        self._annotate_claim(round_no, 1, repr(deadline))

    def publish_progress(self, round_no: int, progress: RoundProgress) -> None:
        self._annotate_claim(round_no, 2, progress.encode().decode())

    def _annotate_claim(self, round_no: int, field: int, value: str) -> None:
        """Set field `field` of round `round_no`'s claim value (see `records.apply_claim`), if held."""
        keys, conn = self.keys, self.conn
        name = keys.claim(round_no)
        raw = conn.get(keys.full(name))
        fields = raw.decode(errors="replace").split("\t")
        if not fields[0] or fields[0] != self._node_id:
            return  # released, or no longer ours: the holder publishes its own
        fields += [""] * (3 - len(fields))
        fields[field] = value
        new = "\t".join(fields)
        if conn.compare_set(keys.full(name), raw, new) == new.encode():
            self.connections.log(name, control=True)

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
            self.connections.log(name, control=False)

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
                self.connections.log("state", control=True)
                return

    def withdraw(self) -> None:
        """Stop beating, remove our record and claim: the others see us gone now."""
        with self._lock:
            Ticker.shared().remove(self._pulse)
            self._pulse = None
            node_id, claim = self._node_id, self._claim
            self._claim = None
            self._lost = True  # no heartbeats from here on: we are no member any more
        if not self.connections.opened or node_id is None:
            return
        if claim is not None:
            self._release(claim, node_id)
        self._tombstone(node_id)
        self.liveness.stop(self.conn, self.keys)

    def leave(self, finished_round: int = 0) -> None:
        """Stop beating, remove our record; the last node out starts a new generation. (Members
        follow the node records here: they are told either way, `finished_round` or not.)"""
        try:
            leave_run(self.withdraw, self._nodes_left, lambda: self.conn.add(self.keys.gen_counter, 1),
                      self.connections.drop_spares)
        except RendezvousConnectionError as exc:
            # Typically the hosting node is gone already: nothing left to clean up.
            log.info("rendezvous %s: leaving without cleanup: %s", self.settings.run_id, exc)

    def _nodes_left(self) -> bool:
        """Whether another node is still there (never ours to clean up before we connected
        or announced)."""
        return not self.connections.opened or self._node_id is None or bool(self.read_nodes()[0])

    def notice_time(self) -> float:
        return self.liveness.notice_time()

    def keep_alive_lag(self) -> float | None:
        return None  # heartbeats are plain store requests: their latency is in the request metrics

    def round_store(self, record: RoundRecord) -> Store:
        return LazyStore(lambda: PrefixStore(self.keys.store(record.round), self.connections.agent_store()))

    def clean_hint(self) -> str:
        return f"restart the node that serves the store ({self.where}): the run's state lives only in that process"

    def expiry(self) -> float | None:
        return None  # the store's keys never expire; the last node out starts a new generation

    def quarantine_board(self) -> C10dQuarantineBoard | None:
        if ELASTIC not in self.capabilities:
            return None  # static: a fixed group cannot go on without one of its nodes
        return C10dQuarantineBoard(lambda: self.conn, lambda: self.keys.full(QUARANTINE_KEY))


def create_backend(settings: RendezvousSettings) -> C10dBackend:
    """The backend for `--rdzv-backend=c10d` (rdzv-launch) and `rdzv-c10d` (torchrun)."""
    opener, where = open_c10d(settings, is_host=config_bool(settings.config, "is_host"))
    backend = C10dBackend(
        settings, opener, where=where, liveness=Heartbeats(settings.lease_ttl, settings.run_id)
    )
    _ = backend.conn  # set the run's keys up now: a broken store fails here, not mid-join
    return backend
