"""What a node waiting for a round reports, and how it names the members it waits for.

Reports go to a callback (rdzv-launch prints them) at most every `PROGRESS_INTERVAL` seconds;
`not_back` and `listed` also word the join-timeout error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from rdzv.rendezvous.model import Control, NodeEntry, RoundRecord
from rdzv.rendezvous.settings import RendezvousSettings

if TYPE_CHECKING:  # annotations only
    from rdzv.backends.api import Backend

ProgressCallback = Callable[[dict[str, object]], None]
PROGRESS_INTERVAL = 5.0
# How many names of missing members a progress report carries.
MISSING_SHOWN = 20
# How often a waiting node that does not coordinate re-reads the records to name who is missing.
NAMES_INTERVAL = 30.0


def previous_round(control: Control, target: int) -> RoundRecord | None:
    """The round before `target`, when it is the one sealed last."""
    return control.sealed if control.round == target - 1 else None


def not_back(previous: RoundRecord | None, nodes: Mapping[str, NodeEntry], target: int) -> list[str]:
    """The previous round's members that have not asked for round `target`, by name."""
    if previous is None:
        return []
    return [previous.name_of(i) for i in previous.ids if i not in nodes or nodes[i].info.want < target]


def listed(names: list[str], limit: int = 5) -> str:
    """'a, b, c, d, e and 3 more': at most `limit` names."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def rejoin_wanted(target: int, missing: list[str]) -> str:
    """"round 3's a, b to rejoin": the members of the round before `target` not back yet."""
    return f"round {target - 1}'s {listed(missing)} to rejoin"


class ProgressReports:
    """Throttled progress reports of one node's join to a callback (none: no reports)."""

    def __init__(self, settings: RendezvousSettings) -> None:
        self.settings = settings
        self.callback: ProgressCallback | None = None
        self._last = 0.0
        # A non-coordinator reads the records for names at most every NAMES_INTERVAL: with
        # hundreds of nodes waiting, a full read each from every one adds up.
        self._names: tuple[int, float, list[str]] | None = None  # (target, read at, names)

    def report(
        self,
        backend: Backend,
        target: int,
        control: Control,
        *,
        role: str,
        spare: bool,
        nodes: Mapping[str, NodeEntry] | None = None,
        joined: int | None = None,
    ) -> None:
        """Report the wait for round `target` if one is due. `role`: "waiting" or
        "coordinator" (`spare`: this node waits outside a full running group); `nodes`: the
        records as the coordinator sees them (read from `backend` when needed otherwise)."""
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        s = self.settings
        previous = None if spare else previous_round(control, target)
        missing: list[str] = []
        if previous is not None and nodes is not None:
            missing = not_back(previous, nodes, target)
        elif previous is not None:
            names = self._names
            if names is None or names[0] != target or now - names[1] >= NAMES_INTERVAL:
                nodes, _ = backend.read_nodes()
                self._names = names = (target, now, not_back(previous, nodes, target))
            missing = names[2]
        if joined is None:
            joined = len(nodes) if nodes is not None else backend.count_nodes()
        last_call = control.last_call.get(target)
        waiting_for = "nodes"
        if spare:
            role, waiting_for = "spare", "a member of the running group to leave"
        elif missing:
            waiting_for = rejoin_wanted(target, missing)
        elif previous is not None:
            waiting_for = "members of the running round to rejoin"
        self.callback(
            {
                "run_id": s.run_id,
                "round": target,
                "joined": joined,
                "min_nodes": s.min_nodes,
                "max_nodes": s.max_nodes,
                "last_call_remaining": None if last_call is None else max(last_call - time.time(), 0.0),
                "waiting_for": waiting_for,
                "missing": missing[:MISSING_SHOWN],
                "role": role,
            }
        )
