"""The narrow interface the rendezvous algorithm needs from a store.

A backend provides: per-node liveness (a lease or heartbeat that removes the node's record when
it dies), an atomic "announce and maybe claim coordination of round N", a compare-and-set of the
sealed-round record, and a feed of changes to wait on instead of polling. Everything else (who
completes a round, when, with which ranks, what counts as waiting) is in
`rdzv.rendezvous.algorithm`.

Cursors (the ints returned by `read_control`, `announce`, `read_nodes`, set on records as
`RoundRecord.cursor` and `Control.cursor`) are opaque to the algorithm: it only hands them back
to `watch` and `seal`. Each backend picks its own meaning (etcd v3: a revision; etcd v2: an etcd
index; c10d: positions in its change logs, packed into one int) and alone knows whether two
of them compare. `Control.token` is no cursor: it is what a seal compares against.

A backend states what it can do in `capabilities`; the algorithm (and the conformance tests)
switch on it instead of assuming every store can do everything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from torch.distributed import Store
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry, NodeInfo, RoundProgress, RoundRecord


class StoreUnreachableError(RendezvousConnectionError):
    """The store did not answer in time (timed out, refused, no leader, overloaded): the same
    request may well succeed later, so the algorithm retries it within its own deadlines.
    Credential, TLS and protocol errors are plain `RendezvousConnectionError`s: retrying them
    would only delay the message."""


class StoreBusyError(StoreUnreachableError):
    """The store was reached but did not serve the request: it accepts connections and stays
    silent (stalled, electing a leader, overloaded) or turns requests away until it has room.
    Unlike a refused connection or an unknown host (a wrong endpoint, said at once), a node
    that starts during such a spell waits for the store (`rdzv.registry`)."""


@dataclass(frozen=True)
class NodeChange:
    """A node record appeared/changed (`entry` set) or disappeared (`entry` None)."""

    node_id: str
    entry: NodeEntry | None


class ChangeFeed(Protocol):
    """Changes after a point in time. `control` is kept current as control events arrive."""

    control: Control

    def poll(self, timeout: float | None) -> list[NodeChange] | None:
        """Block up to `timeout` s for changes. Returns node changes (possibly empty when only
        `control` changed), or None when nothing happened before the timeout."""
        ...

    def close(self) -> None: ...


class QuarantineBoard(Protocol):
    """Where a run's quarantine records live (rdzv.rendezvous.quarantine): one value per host
    under the run's prefix that expires by itself after `ttl` seconds where the store can
    (etcd v3: a lease; etcd v2: a TTL); readers also drop records past their own `until`
    (c10d keeps no clock). Values are opaque here."""

    def put(self, host: str, value: bytes, ttl: float) -> None: ...

    def read(self) -> dict[str, bytes]:
        """Every record by host; a record whose key names no host is left out."""
        ...

    def remove(self, host: str) -> bool:
        """Delete `host`'s record; whether there was one."""
        ...


# Capability names (`Backend.capabilities`).
ELASTIC = "elastic"  # min < max; members are told (num_nodes_waiting) when the group should change
SPARES = "spares"  # nodes beyond max_nodes wait outside the full group until a member leaves
LIVENESS = "liveness"  # a dead node's records disappear by themselves (lease, TTL or heartbeat)
DURABLE = "durable"  # the state outlives any one node (no node hosts the store)
# A sealed round is stored as a small header plus one key per member (no record grows with the
# round, and a member reads its own key only); without it the record lists every member and
# must fit in one value (`sealing.oversize`).
ROSTER_APART = "roster_apart"
ALL_CAPABILITIES = frozenset({ELASTIC, SPARES, LIVENESS, DURABLE})


class Backend(Protocol):
    """What the algorithm needs from a store (see the module docstring)."""

    name: str
    capabilities: frozenset[str]

    def describe(self) -> str:
        """Where the state lives, for messages (e.g. 'etcd 10.0.0.1:2379')."""
        ...

    def open_session(self) -> None:
        """Start this node's liveness (lease/heartbeat). Idempotent while alive."""
        ...

    def session_lost(self) -> bool:
        """True once this node's liveness lapsed (its records are gone from the store)."""
        ...

    def read_control(self) -> tuple[Control, int]:
        """The control state and a cursor to watch from."""
        ...

    def announce(self, node: NodeInfo, control: Control) -> tuple[str | None, int]:
        """Write `node` (wanting round `node.want`) and, in the same atomic step, claim
        coordination of that round if nobody holds it. Returns the coordinator's node id (None
        when control changed since `control` was read: re-read it) and a cursor."""
        ...

    def read_nodes(self) -> tuple[dict[str, NodeEntry], int]:
        """All live node records and a cursor to watch from."""
        ...

    def count_nodes(self) -> int: ...

    def watch(
        self, after: int, control: Control, *, nodes: bool, known: Collection[str] = ()
    ) -> ChangeFeed:
        """Feed of control changes (and node changes when `nodes`) after cursor `after`,
        starting from `control` as read at that cursor. `known`: node ids the caller holds as
        present; a feed that must start over from a fresh read (history compacted away)
        reports those that are gone as removed."""
        ...

    def watch_round(self, record: RoundRecord) -> ChangeFeed:
        """A member's feed of round `record`: control changes, and each member of the round
        whose liveness ended as `NodeChange(node_id, None)`. It may report other node changes
        too; the member ignores them (newcomers and members asking for a new round reach it
        through the forming round's published progress, `Control.progress`)."""
        ...

    def seal(
        self,
        control: Control,
        record: RoundRecord,
        entries: Mapping[str, NodeEntry],
        coordinator: str,
        view_cursor: int,
    ) -> RoundRecord | None:
        """Store `record` as the latest sealed round if control is unchanged since `control`
        was read and `coordinator` still holds the claim. `entries`: the records of (at
        least) the round's members as the coordinator saw them. `view_cursor`: where the
        coordinator's view of the nodes ended (`read_nodes`); a backend whose cursors compare
        has members watch from there or later (`RoundRecord.watch_cursor`), so they also see a
        member that went between that view and the seal (etcd v3: one whose lease ended; one
        gone before its key was written fails the seal). Returns the stored record or None."""
        ...

    def publish_last_call(self, round_no: int, deadline: float) -> None: ...

    def publish_progress(self, round_no: int, progress: RoundProgress) -> None:
        """Round `round_no`'s coordinator reports how it stands (kept while it holds the
        claim; every feed shows it in `Control.progress`)."""
        ...

    def retract(self, node_id: str, round_no: int) -> None:
        """Withdraw this node from a round it gave up on (timeout) and drop any claim on it."""
        ...

    def close_run(self) -> None:
        """Mark the run closed for everyone."""
        ...

    def withdraw(self) -> None:
        """End this node's liveness now (a graceful leave): its records go at once, so the
        others see it gone without waiting for it to lapse. Feeds keep working. Idempotent;
        `leave()` does it too."""
        ...

    def leave(self, finished_round: int = 0) -> None:
        """End this node's liveness; the last node out removes the run's keys.
        `finished_round`: the round this node finished in a run it saw closed (0: none). Its
        going is then no departure, and the round's members need not be told of it."""
        ...

    def notice_time(self) -> float:
        """The longest time from a node's death (its liveness no longer renewed) until the
        others' feeds report its record gone: lease TTL plus the store's expiry granularity."""
        ...

    def keep_alive_lag(self) -> float | None:
        """Seconds this node's oldest unanswered liveness refresh has waited (0.0: all
        answered; None: the backend cannot tell). No request: for metrics."""
        ...

    def round_store(self, record: RoundRecord) -> Store:
        """A torch Store scoped to one round, for the agent and bootstrap."""
        ...

    def clean_hint(self) -> str:
        """How an operator removes this run's state by hand, for messages: a phrase such as
        "remove the run with `rdzv clean ...`", naming a command that works as quoted."""
        ...

    def expiry(self) -> float | None:
        """Seconds until an abandoned run's state goes by itself (None: unknown or never)."""
        ...

    def quarantine_board(self) -> QuarantineBoard | None:
        """The run's quarantine records, or None where quarantine does not apply (static: a
        fixed group cannot go on without a node)."""
        ...

def departures_from_nodes(backend: Backend, record: RoundRecord) -> ChangeFeed:
    """`Backend.watch_round` for a backend whose node feed reports every node change: the
    members' departures are among them."""
    return backend.watch(record.watch_cursor, Control(sealed=record), nodes=True, known=record.ids)
