"""The errors a join ends with, worded for the operator who reads them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousStateError,
    RendezvousTimeoutError,
)

from rdzv.rendezvous.control import Control
from rdzv.rendezvous.decoding import MAX_ROUND_RECORD
from rdzv.rendezvous.progress import rejoin_wanted
from rdzv.rendezvous.records import RoundRecord
from rdzv.rendezvous.settings import RendezvousSettings

if TYPE_CHECKING:  # annotations only
    from rdzv.backends.api import Backend


# An unanswered keep-alive older than this (seconds) means the store went silent: a healthy one
# answers within milliseconds.
SILENT_AFTER = 2.0


def is_silent(keep_alive_lag: float | None) -> bool:
    """Whether a backend's `keep_alive_lag()` says the store stopped answering."""
    return keep_alive_lag is not None and keep_alive_lag >= SILENT_AFTER


def timed_out(
    settings: RendezvousSettings,
    backend: Backend,
    target: int,
    missing: list[str],
    present: int | None,
    silent_for: float = 0.0,
) -> RendezvousTimeoutError:
    """Round `target` did not form within join_timeout with `present` nodes (None: not known
    to this node); names the previous round's members that did not come back (`missing`), or
    says that the store has not answered for `silent_for` s (`is_silent`), which is then the
    news."""
    s = settings
    need = max(s.min_nodes - (present or 0), 1)
    waiting = f"waiting for {need} more" if present is not None else "waiting for more nodes"
    if missing:
        waiting += f", or for {rejoin_wanted(target, missing)}"
    if is_silent(silent_for):
        seen = f" {present} of min {s.min_nodes} node(s) were present as last seen." if present else ""
        return RendezvousTimeoutError(
            f"rendezvous '{s.run_id}' round {target} did not complete within "
            f"{s.join_timeout:g} s: {backend.describe()} not answering for {silent_for:.0f} s "
            f"(this node's keep-alives go unanswered).{seen}"
        )
    seen = "an unknown number of" if present is None else str(present)
    return RendezvousTimeoutError(
        f"rendezvous '{s.run_id}' round {target} did not complete within "
        f"{s.join_timeout:g} s: {seen} node(s) present of min {s.min_nodes} "
        f"(max {s.max_nodes}) on {backend.describe()}; {waiting}. "
        "Raise join_timeout in --rdzv-conf to wait longer."
    )


def round_too_large(run_id: str, backend: Backend, record: RoundRecord, size: int) -> RendezvousError:
    """Round `record` would not fit in one sealed record (`size` bytes): refused, unwritten."""
    per_node = size / max(record.world_size, 1)
    return RendezvousError(
        f"rendezvous '{run_id}' on {backend.describe()}: round {record.round} of "
        f"{record.world_size} nodes needs a {size / 2**20:.2f} MiB sealed record "
        f"(~{per_node:.0f} bytes per node: id and host name), more than the "
        f"{MAX_ROUND_RECORD / 2**20:g} MiB limit a sealed record may have; the round was not "
        "written and the run was closed. Use shorter host names (--local-addr) or fewer nodes "
        "per job (--nnodes)."
    )


def no_room(run_id: str, backend: Backend, sealed: RoundRecord) -> RendezvousError:
    """A full group runs without this node and the backend keeps no spares."""
    return RendezvousError(
        f"rendezvous '{run_id}' on {backend.describe()}: the group of "
        f"{sealed.world_size} node(s) (round {sealed.round}) is full and running without this "
        f"node, and the {backend.name} backend keeps no spares. Give each node its own "
        "place in the group (e.g. a distinct --node-rank)."
    )


def closed_while_waiting(run_id: str, backend: Backend, node_id: str, control: Control) -> Exception:
    """The run closed during this node's join: a graceful exit for a node outside the group."""
    sealed = control.sealed
    if sealed is not None and sealed.rank_of(node_id) is None:
        return RendezvousGracefulExitError(
            f"rendezvous '{run_id}' closed while this node was waiting "
            f"outside the group (round {sealed.round}); exiting cleanly"
        )
    return closed_run(run_id, backend, finished=False)


def closed_run(run_id: str, backend: Backend, *, finished: bool) -> RendezvousClosedError:
    """The run is closed: the job is ending, or (`finished`, found by a node that never joined
    it) a job with this run id finished before."""
    if not finished:
        return RendezvousClosedError(f"rendezvous '{run_id}' was closed (the job is ending)")
    # The old run's own expiry (its lease), not ours: the two may differ.
    expiry = backend.expiry()
    by_itself = (
        f" (its keys also expire by themselves within {math.ceil(expiry)} s if none of "
        "its nodes still runs)"
        if expiry is not None
        else ""
    )
    return RendezvousClosedError(
        f"rendezvous '{run_id}' on {backend.describe()} is closed: a job with this "
        f"run id has finished. Use a new --rdzv-id, or {backend.clean_hint()}{by_itself}."
    )


def unreadable_state(run_id: str, backend: Backend, control: Control) -> RendezvousStateError:
    """A record of the run cannot be read, so no new round can form."""
    # Running members were left alone (their view is the one before the bad write); a new
    # round cannot be formed on a state nobody can read.
    key, why = next(iter(sorted(control.corrupt.items())))
    return RendezvousStateError(
        f"rendezvous '{run_id}' on {backend.describe()}: {key} does not "
        f"hold a valid rendezvous record ({why}), so no new round can form. Stop the job, "
        f"{backend.clean_hint()}, and start it again."
    )


def withdrawn(run_id: str) -> RendezvousError:
    """This node left the run (`withdraw`) and cannot join it again through the same handler."""
    return RendezvousError(
        f"rendezvous '{run_id}': this node has left the run; a new handler "
        "is needed to join it again"
    )


def shut_down(run_id: str) -> RendezvousClosedError:
    """This node's handler was shut down (another thread) while its join waited."""
    return RendezvousClosedError(
        f"rendezvous '{run_id}': this node's handler was shut down while it waited"
    )
