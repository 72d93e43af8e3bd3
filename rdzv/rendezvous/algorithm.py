"""The rendezvous algorithm, written once for every backend: one node's join loop.

Per round, each node writes one record ("I want round N") and one node, the first to ask, claims
the coordination of round N in the same atomic step. The coordinator (`coordinator.py`) alone
reads the node records, and seals the round when `seal_condition.decide` says so; everyone else
waits for one change: the sealed round, reading the progress the coordinator publishes.

After a round seals, each member follows it through `RoundMembership` (`membership.py`): the
backend's feed of departures (etcd v3: deletes of the round's live keys; etcd-v2 and c10d: the
node records) and the progress published for the next round (newcomers with room, members
asking for a new round) make `num_nodes_waiting()` positive, which is what makes torch's agent
restart the group.

Restarts after worker failures are counted once for the whole job, in the sealed round: a node
whose workers failed with every member still there says so in its record (`failed`), and the
coordinator charges one restart when such a node asks for the next round, unless a member of
the previous round is gone by then (a membership change). Every node reads the count from the
same sealed record, so every node agrees on it. docs/rendezvous.md tells the whole story.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time

from rdzv.backends.api import ELASTIC, LIVENESS, SPARES, Backend, ChangeFeed
from rdzv.ports import free_port
from rdzv.rendezvous import join_errors
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.coordinator import Coordinator
from rdzv.rendezvous.membership import Departures, GroupCounts, RoundMembership
from rdzv.rendezvous.outage import StoreUnreachableError, ride_out
from rdzv.rendezvous.progress import (
    PROGRESS_INTERVAL,
    ProgressCallback,
    ProgressReports,
    previous_round,
)
from rdzv.rendezvous.quarantine import Quarantine
from rdzv.rendezvous.records import NodeInfo, RoundRecord
from rdzv.rendezvous.segments import segment_label, segment_size
from rdzv.rendezvous.settings import RendezvousSettings

log = logging.getLogger("rdzv")

ADMISSION_PER_NODE = 50e-6  # seconds of admission window per node of max_nodes
ADMISSION_MAX = 0.5  # seconds: the widest admission window


class Rendezvous:
    """One node's side of the rendezvous over a `Backend`."""

    def __init__(
        self,
        settings: RendezvousSettings,
        backend: Backend,
        *,
        node_id: str | None = None,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.node_id = node_id or f"{os.urandom(5).hex()}"
        # Natural-sort key for new ranks: the node's address when given (what operators name
        # hosts by), else its host name.
        self.host = host or settings.local_addr_given or socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self._membership: RoundMembership | None = None
        self._closed_feed: ChangeFeed | None = None
        self._progress = ProgressReports(settings)
        self._joined_before = False
        self._shut = False
        self._join_deadline = 0.0  # of the join in progress (monotonic)
        self._last_round = 0  # the latest round this node was a member of
        self._withdrawn = False
        self._seen_closed = False  # the run was seen closed from outside the group
        self._finished = False  # shut down as a member of the run, closed
        # The round in which our workers failed with no member gone, until the next join
        # reports it (the coordinator charges the job's restart budget for it).
        self._failed_round = 0
        # Whole-segment rounds (0: off) and this node's label (rdzv.rendezvous.segments).
        self._segment_size = segment_size(settings)
        self._segment = segment_label(settings)
        self._quarantine = Quarantine.for_backend(settings, backend)

    # ----------------------------------------------------------------- public operations
    def set_progress_callback(self, callback: ProgressCallback | None) -> None:
        self._progress.callback = callback

    def join(self) -> RoundRecord:
        """Block until this node is a member of a sealed round; return that round.

        A store that does not answer is retried with backoff until join_timeout: an outage must
        not end a job that can go on once the store is back."""
        s = self.settings
        self._join_deadline = time.monotonic() + s.join_timeout
        # Admission: N nodes that start (or notice a loss) in the same instant spread their
        # first requests over a window that grows with the job (50 ms at 1,024 nodes, 0.5 s
        # from 10,240), so etcd takes them as a stream instead of one burst.
        time.sleep(random.uniform(0.0, min(s.max_nodes * ADMISSION_PER_NODE, ADMISSION_MAX)))
        record = ride_out(
            self._join_once, lambda: self._join_deadline,
            run_id=s.run_id, where=self.backend.describe(), join_timeout=s.join_timeout,
        )
        self._last_round = record.round
        return record

    def _join_once(self) -> RoundRecord:
        if self._withdrawn:
            raise join_errors.withdrawn(self.settings.run_id)
        self._end_membership()
        self.backend.open_session()
        s = self.settings
        deadline = self._join_deadline  # moved on while this node waits as a spare
        control, cursor = self.backend.read_control()
        if control.corrupt:
            raise join_errors.unreadable_state(s.run_id, self.backend, control)
        if control.closed:
            raise join_errors.closed_run(s.run_id, self.backend, finished=not self._joined_before)
        # Never a round number this node was in already: when the run's records lapsed (etcd
        # down past the run lease), the next round must not reuse one.
        target = max(control.round, self._last_round) + 1
        check_quarantine = self._quarantine.enabled  # before the first announce, and when left out
        while True:
            if self._shut:
                # Shut down while a join was still waiting (another thread): never announce
                # again, or a run the last node out just deleted would be written anew.
                raise join_errors.shut_down(s.run_id)
            if control.corrupt:
                raise join_errors.unreadable_state(s.run_id, self.backend, control)
            if control.closed:
                raise join_errors.closed_while_waiting(s.run_id, self.backend, self.node_id, control)
            sealed = control.sealed
            if sealed is not None and sealed.round >= target:
                if sealed.rank_of(self.node_id) is not None:
                    self._joined_before = True
                    self._failed_round = 0
                    return sealed
                target = sealed.round + 1
                check_quarantine = self._quarantine.enabled
            if SPARES not in self.backend.capabilities and sealed and self._spare(control, target):
                raise join_errors.no_room(s.run_id, self.backend, sealed)
            if self.backend.session_lost():
                log.warning("rendezvous %s: this node's lease lapsed; re-registering", s.run_id)
                self.backend.open_session()
            if check_quarantine:
                check_quarantine = False
                leave = functools.partial(self.backend.retract, self.node_id, target)
                if self._quarantine.sit_out(self.host, leave, self._ended):
                    deadline = self._join_deadline = time.monotonic() + s.join_timeout
                    control, cursor = self.backend.read_control()
                    continue
            info = NodeInfo(
                node_id=self.node_id,
                host=self.host,
                addr=s.local_addr,
                pid=self.pid,
                port=free_port(),
                want=target,
                rank_hint=s.rank_hint,
                local_world_size=s.local_world_size,
                failed=self._failed_round,
                segment=self._segment,
                role=s.role,
            )
            coordinator, cursor = self.backend.announce(info, control)
            if coordinator is None:  # control moved on (sealed, closed): look again
                control, cursor = self.backend.read_control()
                continue
            control.coordinators[target] = coordinator
            if coordinator == self.node_id:
                control = Coordinator(
                    s, self.backend, self.node_id, self.host, target, self._quarantine,
                    self._segment_size, self._progress, self._spare, self._give_up,
                ).run(control, cursor, deadline)
                check_quarantine = self._quarantine.enabled  # we may have set ourselves aside
            else:
                control = self._await_seal(target, control, cursor, deadline)
            if self._spare(control, target):
                deadline = self._join_deadline = max(deadline, time.monotonic() + s.join_timeout)

    def begin_membership(self, record: RoundRecord) -> None:
        """Start watching for departures and newcomers after joining `record`."""
        # A fixed group (no ELASTIC) only needs the control changes, e.g. to see a close.
        elastic = ELASTIC in self.backend.capabilities
        self._membership = RoundMembership(record=record, backend=self.backend, watch_nodes=elastic)

    def num_nodes_waiting(self) -> int:
        """Nodes the current group should make room for (answered from local state)."""
        if ELASTIC not in self.backend.capabilities:
            return 0  # a fixed group never asks its members to make room
        if self.backend.session_lost():
            return 1  # we were dropped from the group; restart so we can rejoin
        membership = self._membership
        if membership is None:
            return 0
        membership.drain()
        if membership.feed.control.closed:
            # The job is ending: peers that finish close the run, then leave. Their departure is
            # not a loss to recover from (nothing can re-form a closed run), so let workers finish.
            return 0
        return membership.waiting()

    def group_counts(self) -> GroupCounts:
        """`GroupCounts` as of the last look at the feed (`num_nodes_waiting`, `departures`):
        no request, no draining; all zero before the first round."""
        membership = self._membership
        return membership.counts() if membership is not None else GroupCounts()

    def departures(self) -> Departures:
        """Who of this node's round left or was lost, as seen so far (answered from local
        state). Empty when the run is closed: finishing peers leave, that is no departure."""
        caps = self.backend.capabilities
        membership = self._membership
        if ELASTIC not in caps or LIVENESS not in caps or membership is None:
            return Departures()
        membership.drain()
        if membership.feed.control.closed:
            return Departures()
        return membership.departures(self.node_id, self.backend.session_lost())

    def notice_time(self) -> float:
        """Seconds within which a member that stopped without leaving is seen as lost (0:
        never, the backend has no liveness)."""
        if ELASTIC not in self.backend.capabilities:
            return 0.0
        return self.backend.notice_time()

    def count_failure(self) -> None:
        """Our workers failed with every member of the round still there: the next round we
        ask for charges the job one restart (unless a member is gone by the time it forms)."""
        membership = self._membership
        self._failed_round = membership.record.round if membership is not None else 0

    def withdraw(self) -> None:
        """Leave the group now, without closing the run: this node's records go at once, so
        the others restart without it instead of noticing at lease expiry. The membership
        watch stays open (see `peers_moved_on`); `leave()` or `shutdown()` ends the rest."""
        self._withdrawn = True
        self.backend.withdraw()

    def stand_aside(self) -> None:
        """Out of the group until the next join (a failed health check): our liveness ends, so
        our records go and the members see us gone and re-form; unlike `withdraw`, the next
        join opens it again. Nothing to do before our first round."""
        self._end_membership()
        if self._joined_before:
            self.backend.withdraw()

    def peers_moved_on(self) -> bool:
        """Whether every other member of our round has asked for a new round (so its workers
        are stopped) or is gone. True when there is no round to wait for."""
        membership = self._membership
        if membership is None or ELASTIC not in self.backend.capabilities:
            return True  # a fixed group is never told of a departure: nobody to wait for
        membership.drain()
        return membership.feed.control.closed or membership.moved_on(self.node_id)

    def is_closed(self) -> bool:
        try:
            return self._is_closed()
        except StoreUnreachableError:
            # Not known to be closed: a store outage must not end anything (asked again later).
            return False

    def _is_closed(self) -> bool:
        if self._membership is not None:
            return self._seen_closed_by_members()
        feed = self._closed_watch()
        # Once seen closed, closed for this process: the last node out removes the marker with
        # the run's keys, and a node outside the group (a failed health check) must not miss
        # the end between two looks.
        while feed.poll(0) is not None:
            self._seen_closed |= feed.control.closed
        self._seen_closed |= feed.control.closed
        return self._seen_closed

    def _seen_closed_by_members(self) -> bool:
        """Whether this node's membership feed shows the run closed (no request). Drained
        through the membership, so node changes read here still count as lost or new."""
        membership = self._membership
        if membership is None:
            return False
        membership.drain()
        return membership.feed.control.closed

    def close(self) -> None:
        self.backend.close_run()

    def shutdown(self) -> bool:
        if self._shut:
            return True
        try:
            # Only a member closes the run on its way out. A node that never got into a round
            # (timed out, refused, misconfigured) must not end a run that others are running:
            # torch's launcher shuts every handler down, whatever the reason it stops.
            closed = self._seen_closed_by_members()
            # The job is ending: the others' departures mean nothing now, so stop being sent
            # them before our own close and leave set them off (each member would get N).
            self._end_membership()
            if self._joined_before and not closed:
                self.backend.close_run()
            self._finished = self._joined_before  # closed: our going is no departure
        finally:
            self.leave()
        return True

    def leave(self) -> None:
        """Leave the run without closing it (a node stopped by a signal): the others go on."""
        if self._shut:
            return
        self._shut = True
        self._end_membership()
        if self._closed_feed is not None:
            self._closed_feed.close()
            self._closed_feed = None
        self.backend.leave(finished_round=self._last_round if self._finished else 0)

    # ----------------------------------------------------------------- waiting (non-coordinator)
    def _await_seal(
        self, target: int, control: Control, cursor: int, deadline: float
    ) -> Control:
        feed = self.backend.watch(cursor, control, nodes=False)
        try:
            while True:
                control = feed.control
                if control.corrupt or control.closed or control.round >= target:
                    return control
                if control.coordinators.get(target) is None:
                    return control  # the coordinator is gone: re-announce and maybe take over
                if self.backend.session_lost():
                    # Our record went with our lease: the coordinator no longer counts us, so
                    # waiting on would wait for nothing. Announce again on a new lease.
                    return control
                now = time.monotonic()
                if now >= deadline and not self._spare(control, target):
                    self._give_up(target, control)
                spare = self._spare(control, target)
                self._progress.report(target, control, role="waiting", spare=spare)
                feed.poll(min(max(deadline - now, 0.05), PROGRESS_INTERVAL))
        finally:
            feed.close()

    # ----------------------------------------------------------------- helpers
    def _spare(self, control: Control, target: int) -> bool:
        """A spare waits without a deadline: the previous round is full and still running (or,
        with segments, formed without this node: its segment is not whole)."""
        sealed = control.sealed
        return (
            sealed is not None
            and sealed.round == target - 1
            and (sealed.full or self._segment_size > 0)
            and sealed.rank_of(self.node_id) is None
        )

    def _ended(self) -> bool:
        """This node shut down, or the run closed (one read): a wait outside the group ends.
        Such a wait has no deadline, as a spare's: a store outage during it is ridden out."""
        self._join_deadline = time.monotonic() + self.settings.join_timeout
        return self._shut or self.backend.read_control()[0].closed

    def _give_up(
        self,
        target: int,
        control: Control,
        missing: list[str] | None = None,
        joined: int | None = None,
    ) -> None:
        """The join timed out: say how many came and which members of the previous round did
        not come back, by name: as the coordinator sees them (`missing`, `joined`), else as it
        last published them (no node reads every record). When the store went silent, say
        that instead, without asking it anything more (what this node wrote goes with its
        lease)."""
        silent_for = self.backend.keep_alive_lag() or 0.0
        if not join_errors.is_silent(silent_for):
            self.backend.retract(self.node_id, target)
        if missing is None:
            published = control.progress.get(target)
            missing = list(published.missing) if published and previous_round(control, target) else []
            joined = published.joined if published else None
        raise join_errors.timed_out(self.settings, self.backend, target, missing, joined, silent_for)

    def _closed_watch(self) -> ChangeFeed:
        if self._closed_feed is None:
            control, cursor = self.backend.read_control()
            self._closed_feed = self.backend.watch(cursor, control, nodes=False)
        return self._closed_feed

    def _end_membership(self) -> None:
        if self._membership is not None:
            self._membership.close()
            self._membership = None
