"""torch's `RendezvousHandler` over the backend-independent algorithm."""

from __future__ import annotations

import logging
import time

from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from rdzv.backends.api import Backend
from rdzv.rendezvous.algorithm import Rendezvous
from rdzv.rendezvous.membership import Departures, GroupCounts
from rdzv.rendezvous.observed import BackendObserver, ObservedBackend
from rdzv.rendezvous.progress import ProgressCallback
from rdzv.rendezvous.round_store import GuardedRoundStore
from rdzv.rendezvous.settings import RendezvousSettings

log = logging.getLogger("rdzv")


class RdzvHandler(RendezvousHandler):
    """A rendezvous handler for torch's elastic agent (and torchrun), any backend."""

    def __init__(self, settings: RendezvousSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.rendezvous = Rendezvous(settings, backend)
        self._round: int | None = None
        self._restarts = 0
        self._identical = 0
        self._last_warning = 0.0

    def get_backend(self) -> str:
        return self.settings.backend

    @property
    def use_agent_store(self) -> bool:
        # Workers build their own TCPStore at MASTER_ADDR:MASTER_PORT (rank 0's free port,
        # published for every round), so a new rank 0 never depends on an old agent's server.
        return False

    def next_rendezvous(self) -> RendezvousInfo:
        record = self.rendezvous.join()
        rank = record.rank_of(self.rendezvous.node_id)
        assert rank is not None
        self.rendezvous.begin_membership(record)
        self._round, self._restarts = record.round, record.restarts
        self._identical = record.identical
        log.info(
            "rendezvous %s: joined round %d as node rank %d of %d (master %s:%d)",
            self.settings.run_id, record.round, rank, record.world_size,
            record.master_addr, record.master_port,
        )
        store = self.backend.round_store(record)
        if self.rendezvous.notice_time() > 0:
            # Departures are seen: a member lost before ranks are assigned ends the wait.
            store = GuardedRoundStore(store, record.round, self.departures)
        return RendezvousInfo(
            store=store,
            rank=rank,
            world_size=record.world_size,
            bootstrap_store_info=RendezvousStoreInfo(record.master_addr, record.master_port),
        )

    def is_closed(self) -> bool:
        return self.rendezvous.is_closed()

    def set_closed(self) -> None:
        self.rendezvous.close()

    def num_nodes_waiting(self) -> int:
        try:
            return self.rendezvous.num_nodes_waiting()
        except RendezvousConnectionError as exc:
            # The agent polls this while workers train: a store outage must not kill a healthy
            # group. Lost members still surface once the store is back.
            self._cannot_check(exc)
            return 0

    def _cannot_check(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning("rendezvous %s: cannot check membership: %s", self.settings.run_id, exc)

    # ------------------------------------------------------------ beyond torch's interface
    # rdzv-launch's agent uses these to tell a peer's departure from a worker failure and to
    # leave gracefully on a signal; torch's agent (torchrun) does not know them.

    def departures(self) -> Departures:
        """Members of the current round that left or were lost, seen so far (no request once
        the membership watch is open). Always present when `num_nodes_waiting()` counts them;
        empty once the run is closed."""
        try:
            return self.rendezvous.departures()
        except RendezvousConnectionError as exc:
            self._cannot_check(exc)
            return Departures()

    def keep_alive_lag(self) -> float | None:
        """Seconds this node's oldest unanswered liveness refresh (etcd lease keep-alive) has
        waited; None where the backend cannot tell. No request."""
        return self.backend.keep_alive_lag()

    @property
    def notice_time(self) -> float:
        """Seconds within which a member that died is seen as gone (0: never seen)."""
        return self.rendezvous.notice_time()

    def count_failure(self) -> None:
        """This node restarts after a worker failure that no departure explains: the next
        round charges the job one restart, unless a member is gone by the time it forms."""
        self.rendezvous.count_failure()

    @property
    def restarts(self) -> int:
        """Worker-failure restarts the job has used, as of the round this node last joined
        (the same number on every node of that round)."""
        return self._restarts

    @property
    def identical_workers(self) -> int:
        """Workers per node when every member of the round this node last joined runs the same
        number with the same role (0: not known to be so)."""
        return self._identical

    def withdraw(self) -> None:
        """Leave the group at once without closing the run (a node being stopped): this
        node's record goes now, and the others restart without it."""
        self.rendezvous.withdraw()

    def stand_aside(self) -> None:
        """Stay out of the next round for now (a failed health check): this node's record goes,
        so the group re-forms without it; the next `next_rendezvous()` announces it again."""
        self.rendezvous.stand_aside()

    def peers_moved_on(self) -> bool:
        """Whether every other member of the round has asked for a new round or is gone."""
        try:
            return self.rendezvous.peers_moved_on()
        except RendezvousConnectionError:
            return True  # nothing more to learn: do not hold the node up

    def leave(self) -> None:
        """End this node's part without closing the run (after `withdraw`, on a signal)."""
        try:
            self.rendezvous.leave()
        except RendezvousError as exc:
            log.warning("rendezvous %s: could not leave cleanly: %s", self.settings.run_id, exc)

    def get_run_id(self) -> str:
        return self.settings.run_id

    def shutdown(self) -> bool:
        try:
            return self.rendezvous.shutdown()
        except RendezvousError as exc:
            # As torch's handlers: False, not an exception, so the job's outcome stands (the
            # c10d store may have left with the node that hosted it).
            log.warning("rendezvous %s: could not close the run on the way out: %s", self.settings.run_id, exc)
            return False

    def set_progress_callback(self, callback: ProgressCallback | None) -> None:
        """Called every few seconds while waiting with a dict describing the wait."""
        self.rendezvous.set_progress_callback(callback)

    def group_counts(self) -> GroupCounts:
        """Newcomers, spares, lost and rejoining members around this node's round, as of the
        last `num_nodes_waiting()` (no request)."""
        return self.rendezvous.group_counts()

    def observe_backend(self, observer: BackendObserver) -> None:
        """Report every store request from now on to `observer` (rdzv.rendezvous.observed)."""
        backend = self.backend
        inner = backend.inner if isinstance(backend, ObservedBackend) else backend
        observed: Backend = ObservedBackend(inner, observer)  # type: ignore[assignment]
        self.backend = self.rendezvous.backend = observed

    @property
    def capabilities(self) -> frozenset[str]:
        """What the backend can do (`rdzv.backends.api.ELASTIC`, ...)."""
        return self.backend.capabilities

    @property
    def node_id(self) -> str:
        return self.rendezvous.node_id

    @property
    def round(self) -> int | None:
        """The round this node last joined."""
        return self._round
