"""The etcd v2 backend (python-etcd over etcd's v2 HTTP API, `--enable-v2` on etcd 3.4/3.5).

Same algorithm and semantics as the v3 backend; v2 lacks leases, transactions and watch
streams, so this file emulates them. Keys are laid out by `rdzv.layouts.EtcdV2Layout`.

What the emulation costs, compared with v3:

* Liveness: every key a node owns has its own TTL and is refreshed (``refresh=true``, which
  wakes no watcher) by one keep-alive thread per process every lease_ttl/3: one HTTP request
  and one raft write per key per interval, where v3 renews one lease without a raft write.
  A node owns one key, the coordinator three. Directories are never given a TTL: etcd 3.5
  rejects refreshing one (etcd-io/etcd#13589).
* Run keys: the state document is refreshed only by the coordinator of a forming round and by
  the first two ranks of the running round (not by every node), with run_ttl = 3 x lease_ttl,
  so a crashed job's state expires within seconds of its last node while a live job pays two
  or three writes per interval for it, whatever its size. Round stores expire on a fixed clock
  (store_ttl, default 7200 s, torch's etcd-v2 TTL). Empty directories stay behind after a
  crash (v2 cannot expire them); they hold no data.
* announce: write the node key, try to create the coordinator key (prevExist=false), read the
  control directory: three requests where v3 sends one transaction. The "only if the sealed
  round and the closed flag are unchanged" guard is checked on that read; a claim made against
  a stale view is withdrawn (compare-and-delete) instead of never being made.
* seal: one compare-and-swap on the state document (prevValue, so TTL refreshes do not count as
  changes), after checking the coordinator key; then deletes of the claim and the last call.
* Watches are long polls: one HTTP request per event (v2 has no streaming in python-etcd), each
  feed on its own thread; a feed that fell more than 1000 events behind (EtcdEventIndexCleared)
  re-reads the directory and replays the difference, deletions included.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection, Mapping

import etcd
from torch.distributed import Store

from rdzv.backends.api import ALL_CAPABILITIES, departures_from_nodes
from rdzv.backends.common.etcd_expiry import seen_gone_within
from rdzv.backends.common.last_out import leave_run
from rdzv.backends.common.pumped_feed import PumpedFeed
from rdzv.backends.common.run_keepers import RUN_TTL_LEASES, KeepReasons, keeps_run
from rdzv.backends.common.state_document import apply_state, encode_state
from rdzv.backends.common.ticker import Ticker
from rdzv.backends.etcd_v2.client import (
    EtcdV2Client,
    EtcdV2Error,
    index_of,
    v2_errors,
    whole_seconds,
)
from rdzv.backends.etcd_v2.feed import EtcdV2Watcher
from rdzv.backends.etcd_v2.quarantine import EtcdV2QuarantineBoard
from rdzv.backends.etcd_v2.store import EtcdV2Store
from rdzv.layouts import EtcdV2Layout
from rdzv.rendezvous.control import Control, guard
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundProgress, RoundRecord, node_entry
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings, config_number

log = logging.getLogger("rdzv")

DEFAULT_STORE_TTL = 7200.0
WATCH_WAIT = 10.0  # longest long poll; a closed feed's thread ends within this


class EtcdV2Backend:
    """`Backend` over etcd's v2 API."""

    name = "etcd-v2"
    capabilities = ALL_CAPABILITIES

    def __init__(self, settings: RendezvousSettings, client: EtcdV2Client, *, store_ttl: float) -> None:
        self.settings = settings
        self.client = client
        self.keys = EtcdV2Layout(settings.run_prefix)
        self.lease_ttl = whole_seconds(settings.lease_ttl)
        self.run_ttl = self.lease_ttl * RUN_TTL_LEASES
        self.store_ttl = store_ttl
        self._node_id: str | None = None
        self._lock = threading.Lock()
        self._owned: set[str] = set()  # keys this node keeps alive (its node key and claims)
        self._leading = KeepReasons()  # why we keep the state document alive
        self._lost = False
        self._keeper: int | None = None
        # When the oldest refresh etcd has not answered yet was started (None: all answered).
        self._unanswered_since: float | None = None

    def describe(self) -> str:
        return self.client.describe()

    # ------------------------------------------------------------------ liveness
    def open_session(self) -> None:
        with self._lock:
            self._lost = False
            if self._keeper is None:
                self._unanswered_since = None
                self._keeper = Ticker.shared().add(self.settings.lease_ttl / 3, self._keep_alive)

    def session_lost(self) -> bool:
        return self._lost or self._keeper is None

    def _keep_alive(self) -> None:
        """Refresh every owned key, and the state document while this node leads the run."""
        with self._lock:
            owned = sorted(self._owned)
            lead = bool(self._leading)
            if not owned:
                self._unanswered_since = None  # nothing to refresh: nothing unanswered
            elif self._unanswered_since is None:
                self._unanswered_since = time.monotonic()
        for key in owned:
            try:
                self.client.refresh(key, self.lease_ttl)
                with self._lock:
                    self._unanswered_since = None
            except etcd.EtcdKeyNotFound:
                # Expired before we got to it (stalled process, etcd unreachable too long).
                with self._lock:
                    self._unanswered_since = None  # an answer all the same
                    self._owned.discard(key)
                    if self._node_id is not None and key == self.keys.node(self._node_id):
                        self._lost = True
                log.warning("rendezvous %s: %s expired before its refresh", self.settings.run_id, key)
            except (EtcdV2Error, etcd.EtcdException) as exc:
                log.warning("rendezvous %s: refreshing %s failed: %s", self.settings.run_id, key, exc)
        if lead:
            with contextlib.suppress(EtcdV2Error, etcd.EtcdException):
                self.client.refresh(self.keys.state, self.run_ttl)

    def _follow(self, sealed: RoundRecord | None) -> None:
        """The first ranks of the latest sealed round keep the state document alive; every
        read or feed of the state says whether that is (still) us."""
        self._lead("member", keeps_run(sealed, self._node_id))

    def _own(self, key: str, owned: bool = True) -> None:
        with self._lock:
            if owned:
                self._owned.add(key)
            else:
                self._owned.discard(key)

    def _lead(self, reason: str, leading: bool) -> None:
        with self._lock:
            self._leading.hold(reason, leading)

    # ------------------------------------------------------------------ control state
    def apply_control(self, control: Control, key: str, value: str | None) -> None:
        """One control key's change; a value that does not decode leaves `control` as it was,
        noted in `control.corrupt` (model.guard)."""
        keys = self.keys
        if key == keys.state:
            apply_state(control, value, key)
            self._follow(control.sealed)
            return
        per_round = keys.per_round(key)
        if per_round is not None:
            with guard(control, key):
                control.apply_round_value(*per_round, value)

    def _read_dir(self, path: str) -> tuple[list[etcd.EtcdResult], int]:
        with v2_errors(self.describe()):
            try:
                result = self.client.read(path, recursive=True)
            except etcd.EtcdKeyNotFound as exc:
                return [], index_of(exc)
        return [n for n in result.leaves if not n.dir], result.etcd_index

    def read_control(self) -> tuple[Control, int]:
        leaves, index = self._read_dir(self.keys.ctl)
        control = Control()
        for leaf in leaves:
            self.apply_control(control, leaf.key, leaf.value)
        return control, index

    def announce(self, node: NodeInfo, control: Control) -> tuple[str | None, int]:
        keys = self.keys
        self._node_id = node.node_id
        coord = keys.coord(node.want)
        claimed = False
        with v2_errors(self.describe()):
            # A plain set replaces the key, so createdIndex (the arrival) is this announce.
            self.client.write(keys.node(node.node_id), node.encode().decode(), ttl=self.lease_ttl)
            self._own(keys.node(node.node_id))
            try:
                self.client.write(coord, node.node_id, ttl=self.lease_ttl, prevExist=False)
                claimed = True
                self._own(coord)
            except etcd.EtcdAlreadyExist:
                pass
        now, index = self.read_control()
        if now.corrupt or now.closed or now.token != control.token:
            # The sealed round or the closed flag moved on: a claim made against the old view
            # must not stand (v3 would not have made it).
            if claimed:
                self._release(coord, node.node_id)
            return None, index
        holder = now.coordinators.get(node.want)
        self._lead("coordinator", holder == node.node_id)
        return holder, index

    def _release(self, key: str, node_id: str) -> bool:
        """Delete the claim at `key` if `node_id` holds it; whether it did."""
        self._own(key, False)
        with contextlib.suppress(EtcdV2Error, etcd.EtcdException):
            self.client.delete(key, prevValue=node_id)
            return True
        return False

    def read_nodes(self) -> tuple[dict[str, NodeEntry], int]:
        leaves, index = self._read_dir(self.keys.nodes)
        nodes: dict[str, NodeEntry] = {}
        for leaf in leaves:
            node_id = leaf.key[len(self.keys.nodes) + 1 :]
            entry = node_entry(leaf.key, node_id, leaf.value or "", leaf.createdIndex)
            if entry is not None:
                nodes[node_id] = entry
        return nodes, index

    def count_nodes(self) -> int:
        # The directory read returns the values anyway: count only records that are nodes.
        return len(self.read_nodes()[0])

    def watch(
        self, after: int, control: Control, *, nodes: bool, known: Collection[str] = ()
    ) -> PumpedFeed:
        watcher = EtcdV2Watcher(self, after, nodes=nodes, known=known, read_timeout=self.settings.read_timeout)
        return PumpedFeed(
            control, watcher.fetch, wait=WATCH_WAIT, name=f"rdzv-v2-watch-{self.settings.run_id}"
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
        # `view_cursor` is not needed: members watch from the claim's read below, which is later.
        keys = self.keys
        coord = keys.coord(record.round)
        with v2_errors(self.describe()):
            try:
                holder = self.client.read(coord)
            except etcd.EtcdKeyNotFound:
                return None  # our claim lapsed
            if holder.value != coordinator:
                return None
            # Members watch from just before the seal: nothing after it can be missed.
            sealed = RoundRecord.decode(record.encode(), holder.etcd_index)
            doc = encode_state(sealed, closed=False)
            guard = {"prevValue": control.token} if control.token else {"prevExist": False}
            try:
                self.client.write(keys.state, doc, ttl=self.run_ttl, **guard)
            except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                return None
        self._lead("coordinator", False)
        self._follow(sealed)
        self._release(coord, coordinator)
        self._drop(keys.lastcall(record.round))
        self._drop(keys.progress(record.round))
        if control.sealed is not None:
            # The previous round's store is unused once every live member asked for this one.
            self._drop(keys.store(control.sealed.round), recursive=True)
        return sealed

    def _drop(self, key: str, *, recursive: bool = False) -> None:
        self._own(key, False)
        with contextlib.suppress(EtcdV2Error, etcd.EtcdException):
            if recursive:
                self.client.delete(key, recursive=True, dir=True)
            else:
                self.client.delete(key)

    def publish_last_call(self, round_no: int, deadline: float) -> None:
        key = self.keys.lastcall(round_no)
        with v2_errors(self.describe()):
            self.client.write(key, repr(deadline), ttl=self.lease_ttl)
        self._own(key)

    def publish_progress(self, round_no: int, progress: RoundProgress) -> None:
        key = self.keys.progress(round_no)
        with v2_errors(self.describe()):
            self.client.write(key, progress.encode().decode(), ttl=self.lease_ttl)
        self._own(key)

    def retract(self, node_id: str, round_no: int) -> None:
        self._lead("coordinator", False)
        if self._release(self.keys.coord(round_no), node_id):
            # The round's last call and progress are its coordinator's: a waiting node that
            # gives up must not take them from the one still forming it.
            self._drop(self.keys.lastcall(round_no))
            self._drop(self.keys.progress(round_no))
        self._drop(self.keys.node(node_id))

    def close_run(self) -> None:
        keys = self.keys
        with v2_errors(self.describe()):
            while True:
                control, raw = Control(), None
                with contextlib.suppress(etcd.EtcdKeyNotFound):
                    raw = self.client.read(keys.state).value
                apply_state(control, raw, keys.state)
                # A document that does not decode is replaced by a closed one: the run is ending.
                if control.closed and not control.corrupt:
                    return
                doc = encode_state(control.sealed, closed=True)
                expect = {"prevValue": raw} if raw else {"prevExist": False}
                try:
                    self.client.write(keys.state, doc, ttl=self.run_ttl, **expect)
                    return
                except (etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist, etcd.EtcdKeyNotFound):
                    continue  # a seal or another close won: read again

    def withdraw(self) -> None:
        """Stop refreshing and delete our keys (record, claims): the others see us gone now."""
        with self._lock:
            Ticker.shared().remove(self._keeper)
            self._keeper = None
            self._unanswered_since = None
            owned, self._owned = self._owned, set()
            self._leading.clear()
        for key in owned:
            # Best effort: a key we cannot delete expires on its TTL.
            with contextlib.suppress(EtcdV2Error, etcd.EtcdException):
                self.client.delete(key)

    def leave(self, finished_round: int = 0) -> None:
        """Stop refreshing, delete our keys; if no node is left, remove the run's keys. (Members
        follow the node records here: they are told either way, `finished_round` or not.)"""
        leave_run(self.withdraw, lambda: self.count_nodes() > 0, self._remove_run, self.client.close)

    def _remove_run(self) -> None:
        # Converted only if not swallowed: another node may have removed it first.
        with v2_errors(self.describe()), contextlib.suppress(etcd.EtcdKeyNotFound):
            self.client.delete(self.keys.root, recursive=True, dir=True)

    def notice_time(self) -> float:
        # Keys expire on etcd's 500 ms sync tick; the delete then ends a long poll.
        return seen_gone_within(self.lease_ttl)

    def keep_alive_lag(self) -> float | None:
        with self._lock:
            if self._keeper is None:
                return None
            since = self._unanswered_since
        return 0.0 if since is None else time.monotonic() - since

    def round_store(self, record: RoundRecord) -> Store:
        return EtcdV2Store(self.client, self.keys.store(record.round), ttl=self.store_ttl)

    def clean_hint(self) -> str:
        s = self.settings
        scheme = "https" if s.access.tls else "http"
        host = s.endpoints[0].split("://")[-1]
        return (
            "remove the run through etcd's v2 API with "
            f"`curl -X DELETE '{scheme}://{host}/v2/keys{self.keys.root}?dir=true&recursive=true'`"
        )

    def expiry(self) -> float | None:
        # The state document (sealed round, closed flag) is what blocks the id; it expires
        # run_ttl after its last refresh.
        try:
            ttl = self.client.read(self.keys.state).ttl
        except (EtcdV2Error, etcd.EtcdException):
            return None  # only for a message
        return float(ttl) if ttl is not None else None

    def quarantine_board(self) -> EtcdV2QuarantineBoard:
        return EtcdV2QuarantineBoard(self.client, self.keys)


def _store_ttl(config: Mapping[str, object]) -> float:
    """--rdzv-conf's store_ttl (seconds, at least 60), else torch's etcd-v2 default."""
    value = config_number(config, "store_ttl")
    if value is None:
        return DEFAULT_STORE_TTL
    if value < 60:
        raise ConfigError(f"rendezvous setting store_ttl={config['store_ttl']!r} must be at least 60 seconds")
    return value


def create_backend(settings: RendezvousSettings) -> EtcdV2Backend:
    """The backend for `--rdzv-backend=etcd-v2` (rdzv-launch) and `rdzv-etcd-v2` (torchrun)."""
    store_ttl = _store_ttl(settings.config)
    client = EtcdV2Client.shared(settings)
    try:
        client.check(settings.run_prefix)
    except BaseException:
        client.close()
        raise
    return EtcdV2Backend(settings, client, store_ttl=store_ttl)
