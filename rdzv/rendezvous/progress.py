"""What a node waiting for a round reports, and how it names the members it waits for.

Reports go to a callback (rdzv-launch prints them) at most every `PROGRESS_INTERVAL` seconds;
`not_back` and `listed` also word the join-timeout error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import MISSING_SHOWN, NodeEntry, RoundRecord
from rdzv.rendezvous.settings import RendezvousSettings

ProgressCallback = Callable[[dict[str, object]], None]
PROGRESS_INTERVAL = 5.0


def previous_round(control: Control, target: int) -> RoundRecord | None:
    """The round before `target`, when it is the one sealed last."""
    return control.sealed if control.round == target - 1 else None


def not_back(
    previous: RoundRecord | None, nodes: Mapping[str, NodeEntry], target: int, limit: int | None = None
) -> list[str]:
    """The previous round's members that have not asked for round `target`, by name (the
    first `limit` of them)."""
    if previous is None:
        return []
    names: list[str] = []
    for i in previous.ids:
        if i not in nodes or nodes[i].info.want < target:
            names.append(previous.name_of(i))
            if limit is not None and len(names) >= limit:
                break
    return names


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

    def report(
        self,
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
        records as the coordinator sees them. A waiting node reports what the coordinator
        published (`Control.progress`): it reads no records, so N waiting nodes cost the store
        nothing more than one."""
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        s = self.settings
        previous = None if spare else previous_round(control, target)
        missing: list[str] = []
        published = control.progress.get(target)
        if previous is not None and nodes is not None:
            missing = not_back(previous, nodes, target, MISSING_SHOWN)
        elif previous is not None and published is not None:
            missing = list(published.missing)
        if joined is None and nodes is not None:
            joined = len(nodes)
        elif joined is None and published is not None:
            joined = published.joined
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
                "joined": joined,  # None: not known yet
                "min_nodes": s.min_nodes,
                "max_nodes": s.max_nodes,
                "last_call_remaining": None if last_call is None else max(last_call - time.time(), 0.0),
                "waiting_for": waiting_for,
                "missing": missing[:MISSING_SHOWN],
                "role": role,
            }
        )
