"""The etcd v3 backend: leases for liveness, one txn per announce, watches instead of polling.

Keys are laid out by `rdzv.layouts.EtcdV3Layout`. A dead node's keys vanish with its lease; a
crashed job's keys vanish with the run lease once no node keeps it alive; the last node to
leave a finished run deletes the whole prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Collection, Mapping

from torch.distributed import Store
from torch.distributed.elastic.rendezvous import RendezvousStateError

from rdzv.backends.api import ALL_CAPABILITIES, ROSTER_APART, departures_from_nodes
from rdzv.backends.common.etcd_expiry import seen_gone_within
from rdzv.backends.common.last_out import leave_run
from rdzv.backends.common.run_keepers import keeps_run
from rdzv.backends.etcd_v3.client import connect
from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.backends.etcd_v3.feed import EtcdChangeFeed
from rdzv.backends.etcd_v3.quarantine import EtcdV3QuarantineBoard
from rdzv.backends.etcd_v3.roster import EtcdRoster
from rdzv.backends.etcd_v3.round_feed import EtcdRoundFeed
from rdzv.backends.etcd_v3.run_lease import RunLease
from rdzv.backends.etcd_v3.seal import RoundSealer
from rdzv.backends.etcd_v3.store import EtcdStore
from rdzv.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdLeaseNotFoundError,
    KeyValue,
    Op,
    Session,
    prefix_end,
)
from rdzv.layouts import CLAIM, EtcdV3Layout
from rdzv.rendezvous.control import Control, guard
from rdzv.rendezvous.decoding import RecordError, parse_lease_id, parse_node_id
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundProgress, RoundRecord, node_entry
from rdzv.rendezvous.roster import DetachedRoster
from rdzv.rendezvous.settings import DEFAULT_PREFIX, RendezvousSettings

LEAVE_READ_LIMIT = 16  # node records a leaving node reads to decide whether it is the last


class EtcdBackend:
    """`Backend` over etcd's v3 API."""

    name = "etcd-v3"
    capabilities = ALL_CAPABILITIES | {ROSTER_APART}

    def __init__(self, settings: RendezvousSettings, client: EtcdClient) -> None:
        self.settings = settings
        self.client = client
        self.keys = EtcdV3Layout(settings.run_prefix)
        self._session: Session | None = None
        self.run_lease = RunLease(client, self.keys.lease, settings.lease_ttl, self._run_lease_unreadable)
        self._node_id: str | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"etcd {','.join(self.settings.endpoints)}"

    # ------------------------------------------------------------------ liveness
    def open_session(self) -> None:
        with self._lock:
            if self._session is not None and not self._session.lost.is_set():
                return
            if self._session is not None:
                self._session.close()
            with etcd_errors(self.describe()):
                self._session = Session(self.client, ttl=self.settings.lease_ttl)

    def session_lost(self) -> bool:
        session = self._session
        return session is None or session.lost.is_set()

    @property
    def _lease(self) -> int:
        if self._session is None:
            raise RuntimeError("open_session() first")
        return self._session.lease_id

    def _ensure_run_lease(self) -> int:
        with etcd_errors(self.describe()):
            return self.run_lease.ensure()

    def _run_lease_unreadable(self, exc: RecordError) -> Exception:
        return RendezvousStateError(
            f"rendezvous '{self.settings.run_id}' on {self.describe()}: {self.keys.lease} "
            f"does not hold a valid rendezvous record ({exc}). Stop the job, "
            f"{self.clean_hint()}, and start it again."
        )

    # ------------------------------------------------------------------ control state
    def apply_control(self, control: Control, key: str, kv: KeyValue, deleted: bool) -> None:
        """One control key's change. A value that does not decode leaves `control` as it was and
        is noted in `control.corrupt` (model.guard): it must never stop running workers."""
        keys = self.keys
        value = kv.value
        with guard(control, key):
            if key == keys.current:
                if not deleted:
                    control.sealed = self._attach(RoundRecord.decode(value, kv.mod_revision))
                    control.token = kv.mod_revision
                    self.run_lease.keep("member", keeps_run(control.sealed, self._node_id))
            elif key == keys.closed:
                if not deleted and value != b"1":
                    raise RecordError(f"a closed marker holds 1, not {value[:60]!r}")
                control.closed = not deleted
            elif (per_round := keys.per_round(key)) is not None:
                kind, round_text = per_round
                if kind == CLAIM and not deleted and not kv.lease:
                    # A claim lives on its holder's lease; one without would never expire.
                    raise RecordError("a coordinator claim not bound to a node's lease")
                control.apply_round_value(kind, round_text, None if deleted else value)
            elif key == keys.lease:
                if deleted:
                    # It lives on the run lease: gone with it. Nodes that do not keep the lease
                    # learn here that the next write on it needs a new one.
                    self.run_lease.lapsed()
                else:
                    self.run_lease.adopt(parse_lease_id(value))

    def _attach(self, record: RoundRecord) -> RoundRecord:
        """A header read from ctl/current, with its roster (records that list their members,
        from older versions, keep theirs)."""
        if not isinstance(record.roster, DetachedRoster):
            return record
        return record.with_roster(self.roster(record.round))

    def roster(self, round_no: int) -> EtcdRoster:
        return EtcdRoster(self.client, self.keys.ranks(round_no), self.describe)

    def node(self, key: str, kv: KeyValue) -> NodeEntry | None:
        """The node whose record is `kv`, or None when it is not a node record (warned once)."""
        entry = node_entry(key, key[len(self.keys.nodes) :], kv.value, kv.mod_revision)
        return dataclasses.replace(entry, session=kv.lease) if entry is not None else None

    def snapshot(self, start: bytes, end: bytes) -> tuple[Control, dict[str, NodeEntry], int]:
        """Control state and nodes among the keys in [start, end), read at one revision.
        Raises client errors (callers convert them)."""
        result = self.client.range(start, range_end=end)
        control = Control(token=0)
        nodes: dict[str, NodeEntry] = {}
        for kv in result.kvs:
            key = kv.key.decode(errors="replace")
            if key.startswith(self.keys.nodes):
                entry = self.node(key, kv)
                if entry is not None:
                    nodes[entry.info.node_id] = entry
            else:
                self.apply_control(control, key, kv, deleted=False)
        return control, nodes, result.revision

    def read_control(self) -> tuple[Control, int]:
        ctl = self.keys.ctl.encode()
        with etcd_errors(self.describe()):
            control, _, revision = self.snapshot(ctl, prefix_end(ctl))
        return control, revision

    def announce(self, node: NodeInfo, control: Control) -> tuple[str | None, int]:
        keys = self.keys
        self._node_id = node.node_id
        coord = keys.coord(node.want)
        node_put = Op.put(keys.node(node.node_id), node.encode(), lease=self._lease)
        with etcd_errors(self.describe()):
            try:
                result = self.client.txn(
                    [
                        Compare.create_revision(coord) == 0,
                        Compare.mod_revision(keys.current) == int(control.token or 0),
                        Compare.create_revision(keys.closed) == 0,
                    ],
                    [node_put, Op.put(coord, node.node_id, lease=self._lease)],
                    [
                        node_put,
                        Op.get(coord),
                        Op.get(keys.current, keys_only=True),
                        Op.get(keys.closed, keys_only=True),
                    ],
                    idempotent=True,
                )
            except EtcdLeaseNotFoundError:
                if self._session is None:
                    raise
                self._session.lost.set()  # expired under us: the caller re-opens and retries
                return None, 0
        if result.succeeded:
            self.run_lease.keep("coordinator", True)  # until the round is sealed or given up
            return node.node_id, result.revision
        coord_kvs = result.responses[1].kvs
        current_kvs = result.responses[2].kvs
        closed_kvs = result.responses[3].kvs
        current_rev = current_kvs[0].mod_revision if current_kvs else 0
        if closed_kvs or current_rev != int(control.token or 0) or not coord_kvs:
            return None, result.revision
        try:
            return parse_node_id(coord_kvs[0].value), result.revision
        except RecordError:
            return None, result.revision  # a bad claim: re-reading control reports it

    def read_nodes(self) -> tuple[dict[str, NodeEntry], int]:
        start = self.keys.nodes.encode()
        with etcd_errors(self.describe()):
            _, nodes, revision = self.snapshot(start, prefix_end(start))
        return nodes, revision

    def count_nodes(self) -> int:
        with etcd_errors(self.describe()):
            return self.client.range(self.keys.nodes, prefix=True, count_only=True).count

    def watch(
        self, after: int, control: Control, *, nodes: bool, known: Collection[str] = ()
    ) -> EtcdChangeFeed:
        with etcd_errors(self.describe()):
            return EtcdChangeFeed(self, self.settings.run_id, after, control, nodes=nodes, known=known)

    def watch_round(self, record: RoundRecord) -> EtcdRoundFeed | EtcdChangeFeed:
        if not isinstance(record.roster, EtcdRoster):  # a record of an older version
            return departures_from_nodes(self, record)
        control = self.watch(record.watch_cursor, Control(sealed=record), nodes=False)
        try:
            return EtcdRoundFeed(control, self.client, self.keys.live(record.round), record, self.describe(),
                                 self.settings.run_id)
        except BaseException:
            control.close()  # or every later look would leave one more watch behind
            raise

    def seal(
        self,
        control: Control,
        record: RoundRecord,
        entries: Mapping[str, NodeEntry],
        coordinator: str,
        view_cursor: int,
    ) -> RoundRecord | None:
        """Seal `record` (etcd_v3/seal.py: the members' keys, then the header)."""
        try:
            sealed = RoundSealer(self.client, self.keys, self.run_lease, self.describe()).seal(
                control, record, entries, coordinator, self.roster(record.round)
            )
            if sealed is not None:
                self.run_lease.keep("member", keeps_run(sealed, coordinator))
            return sealed
        finally:
            self.run_lease.keep("coordinator", False)  # sealed or given up: a member's reason now

    def publish_progress(self, round_no: int, progress: RoundProgress) -> None:
        self._put_on_session(self.keys.progress(round_no), progress.encode())

    def publish_last_call(self, round_no: int, deadline: float) -> None:
        self._put_on_session(self.keys.lastcall(round_no), repr(deadline).encode())

    def _put_on_session(self, key: str, value: bytes) -> None:
        """Put `key` on this node's lease; a lease already gone is a lost session (the caller
        sees `session_lost()` and announces again), not an error."""
        with etcd_errors(self.describe()):
            try:
                self.client.put(key, value, lease=self._lease, idempotent=True)
            except EtcdLeaseNotFoundError:
                if self._session is None:
                    raise
                self._session.lost.set()

    def retract(self, node_id: str, round_no: int) -> None:
        keys = self.keys
        self.run_lease.keep("coordinator", False)
        # Best effort, on the way to a timeout error: a failure here must not replace that
        # error (our keys go with our lease anyway), so nothing is raised.
        with contextlib.suppress(EtcdError):
            self.client.txn(
                [Compare.value(keys.coord(round_no)) == node_id.encode()],
                [
                    Op.delete(keys.coord(round_no)),
                    Op.delete(keys.node(node_id)),
                    Op.delete(keys.lastcall(round_no)),
                    Op.delete(keys.progress(round_no)),
                ],
                [Op.delete(keys.node(node_id))],
                idempotent=True,
            )

    def close_run(self) -> None:
        # Written once: every member closes on its way out, and every watcher of ctl/ would be
        # sent each of N puts (N^2 events). A marker already there is left as it is; an absent
        # or unreadable one is (re)written.
        closed = self.keys.closed
        with etcd_errors(self.describe()):
            # A read costs no raft commit: of N members closing together, only the first few
            # write (the guard keeps a racing one from putting again).
            kv = self.client.get(closed)
            if kv is not None and kv.value == b"1":
                return
            self.run_lease.write_on(lambda lease: self.client.txn(
                [Compare.value(closed) == b"1"], [], [Op.put(closed, b"1", lease=lease)], idempotent=True,
            ))

    def withdraw(self) -> None:
        """Revoke our lease: our record and any claim vanish at once, watches keep running."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            with etcd_errors(self.describe()):
                session.close()

    def leave(self, finished_round: int = 0) -> None:
        """Revoke our lease; if no node is left, remove the run's keys and its lease."""
        def withdraw() -> None:
            self._detach_live_key(finished_round)
            self.withdraw()

        leave_run(withdraw, self._nodes_left, self._remove_run, self._release)

    def _detach_live_key(self, round_no: int) -> None:
        """Our live key of a finished round onto the run lease: revoking our lease then deletes
        no key members watch (N finishing nodes would send each member N deletes)."""
        if not round_no or self._node_id is None:
            return
        live = self.keys.live(round_no) + self._node_id
        with contextlib.suppress(EtcdError):  # best effort: members would only be told of us
            self.run_lease.write_on(lambda lease: self.client.txn(
                [Compare.create_revision(live) > 0], [Op.put(live, b"", lease=lease, ignore_value=True)], [],
                idempotent=True,
            ))

    def _remove_run(self) -> None:
        with etcd_errors(self.describe()):
            self.client.delete(self.keys.root, prefix=True, idempotent=True)
        if self.run_lease.id is not None:
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(self.run_lease.id)

    def _release(self) -> None:
        self.run_lease.drop()
        self.client.close()  # shared per process: only the last user closes the channel

    def _nodes_left(self) -> bool:
        """Whether a node of the run is still there. Records that are no node (garbage, or not
        on a lease: written by hand) must not keep the run's keys forever; reading at most a
        few values keeps this one small request when many nodes leave at once."""
        with etcd_errors(self.describe()):
            result = self.client.range(self.keys.nodes, prefix=True, limit=LEAVE_READ_LIMIT)
        if result.count > len(result.kvs):
            return True
        return any(
            kv.lease and self.node(kv.key.decode(errors="replace"), kv) is not None for kv in result.kvs
        )

    def round_store(self, record: RoundRecord) -> Store:
        return EtcdStore(
            self.client,
            self.keys.store(record.round),
            lease=self._ensure_run_lease(),
            timeout=300.0,
        )

    def notice_time(self) -> float:
        # etcd revokes expired leases on a 500 ms tick; the delete then reaches every watch.
        return seen_gone_within(self.settings.lease_ttl)

    def keep_alive_lag(self) -> float | None:
        session = self._session
        if session is None:
            return None
        return self.client.lease_keeper.keep_alive_lag(session.lease_id)

    def clean_hint(self) -> str:
        s = self.settings
        prefix = "" if s.prefix == DEFAULT_PREFIX else f" --prefix={s.prefix}"
        conf = " (with the job's --rdzv-conf for TLS and auth)" if s.access.secured else ""
        return (
            f"remove the run with `rdzv clean --rdzv-endpoint={','.join(s.endpoints)}{prefix} "
            f"--rdzv-id={s.run_id}`{conf}"
        )

    def expiry(self) -> float | None:
        # Everything of an abandoned run that blocks its id (ctl/closed, ctl/current) lives on
        # the run lease: its time left is when the id is free again by itself.
        try:
            kv = self.client.get(self.keys.lease)
            if kv is None:
                return None
            ttl = self.client.lease_time_to_live(parse_lease_id(kv.value))
        except (EtcdError, RecordError):
            return None  # only for a message
        return float(ttl) if ttl >= 0 else None

    def quarantine_board(self) -> EtcdV3QuarantineBoard:
        return EtcdV3QuarantineBoard(self.client, self.keys, lambda: etcd_errors(self.describe()))


def create_backend(settings: RendezvousSettings) -> EtcdBackend:
    """The backend for `--rdzv-backend=etcd` (rdzv-launch) and `etcd-v3` (torchrun)."""
    return EtcdBackend(settings, connect(settings))
