"""The coordinator of one claimed round: it follows the node records, counts who may join,
runs the last call, publishes the round's progress, and seals the round (or gives it up).

One `Coordinator` per claim: `Rendezvous` makes one when its announce wins the claim of round
`target` and calls `run()`, which returns the control state the join continues from. Only the
coordinator reads node records; every other node waits for the seal (or reads the progress
published here).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rdzv.backends.api import ROSTER_APART, Backend
from rdzv.rendezvous import join_errors
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.eligible import EligibleView
from rdzv.rendezvous.outage import StoreUnreachableError
from rdzv.rendezvous.progress import PROGRESS_INTERVAL, ProgressReports, not_back
from rdzv.rendezvous.quarantine import Quarantine
from rdzv.rendezvous.records import MISSING_SHOWN, NodeEntry, RoundProgress, RoundRecord
from rdzv.rendezvous.seal_condition import decide
from rdzv.rendezvous.sealing import build_record, oversize
from rdzv.rendezvous.segments import effective_max, room, usable
from rdzv.rendezvous.settings import RendezvousSettings

log = logging.getLogger("rdzv")

# is_spare(control, target): this node waits as a spare (no join deadline).
SpareCheck = Callable[[Control, int], bool]
# give_up(target, control, missing, joined): the join timed out; raises.
GiveUp = Callable[[int, Control, "list[str] | None", "int | None"], None]


@dataclass
class Coordinator:
    """This node's coordination of round `target`, claimed by its announce."""

    settings: RendezvousSettings
    backend: Backend
    node_id: str
    host: str
    target: int
    quarantine: Quarantine
    segment_size: int
    progress: ProgressReports
    is_spare: SpareCheck
    give_up: GiveUp

    def run(self, control: Control, cursor: int, deadline: float) -> Control:
        """Coordinate until the round seals, the claim is lost, or the run moves on; return the
        control state to continue the join from. Raises the join's errors (timed out, a round
        too large to store)."""
        s, target = self.settings, self.target
        nodes, nodes_cursor = self.backend.read_nodes()
        # Watch from the announce: events between it and the snapshot replay to the same state,
        # and control changes in that window are not missed.
        feed = self.backend.watch(cursor, control, nodes=True, known=set(nodes))
        previous = control.sealed if control.round == target - 1 else None
        quarantined = self.quarantine.hosts_out()  # one read, only with quarantine on
        view = EligibleView(target, set(previous.ids) if previous else set(), withheld_hosts=set(quarantined))
        max_nodes = effective_max(s.max_nodes, self.segment_size)
        for node_id, entry in nodes.items():
            view.put(node_id, entry)
        last_call: float | None = None
        published = _Published()
        log.info("rendezvous %s: coordinating round %d", s.run_id, target)
        try:
            while True:
                control = feed.control
                if control.corrupt or control.closed or control.round >= target:
                    return control
                if control.coordinators.get(target) != self.node_id:
                    return control  # our claim lapsed with our lease
                if self.node_id not in nodes or self.backend.session_lost():
                    return control  # our own record was overwritten or went with our lease
                count = self._usable(view, nodes)
                now = time.monotonic()
                decision = decide(
                    count=count, prev_done=view.prev_done, live_prev=bool(view.live_prev),
                    min_nodes=s.min_nodes, max_nodes=max_nodes, last_call=last_call,
                    last_call_timeout=s.last_call_timeout, now=now,
                )
                last_call = decision.last_call
                if decision.last_call_started:
                    self.backend.publish_last_call(target, time.time() + s.last_call_timeout)
                if decision.seal:
                    record = build_record(
                        target, [nodes[i] for i in view.eligible], previous, view.live_prev,
                        view.departed, min_nodes=s.min_nodes, max_nodes=max_nodes,
                        withheld=[nodes[i] for i in view.withheld], segment_size=self.segment_size,
                    )
                    host = self.quarantine.verdict(record, quarantined)
                    if host is not None:
                        # Set aside now, and look again: a spare may take its place, or the
                        # group goes on smaller, or waits for enough nodes.
                        quarantined[host] = self.quarantine.impose(host, record)
                        view.withhold(host, nodes)
                        if host == self.host:
                            # Our own host: hand the round to another coordinator and sit out.
                            self.backend.retract(self.node_id, target)
                            return control
                        continue
                    return self._seal(control, self.quarantine.settled(record, quarantined), nodes, nodes_cursor)
                if now >= deadline and not self.is_spare(control, target):
                    self.give_up(target, control, not_back(previous, nodes, target, MISSING_SHOWN), count)
                waits = [deadline - now, PROGRESS_INTERVAL]
                if last_call is not None:
                    waits.append(last_call - now)
                waits.append(published.publish(
                    self.backend, target, view, previous, nodes, now, self._newcomers(view, nodes)
                ))
                self.progress.report(
                    target, control, role="coordinator",
                    spare=self.is_spare(control, target), nodes=nodes, joined=count,
                )
                # Everything queued is applied before the next look (one look per wake-up,
                # not per batch: thousands of announcements arrive in many batches).
                changes = feed.poll(max(min(waits), 0.01))
                while changes is not None:
                    for change in changes:
                        if change.entry is None:
                            nodes.pop(change.node_id, None)
                            view.drop(change.node_id)
                        else:
                            nodes[change.node_id] = change.entry
                            view.put(change.node_id, change.entry)
                    changes = feed.poll(0)
        finally:
            feed.close()

    def _seal(
        self, control: Control, record: RoundRecord, nodes: dict[str, NodeEntry], nodes_cursor: int
    ) -> Control:
        s = self.settings
        size = None if ROSTER_APART in self.backend.capabilities else oversize(record)
        if size is not None:
            # Close the run: every waiting node stops now. Retracting alone would let the next
            # one claim the round and refuse it too, one by one.
            error = join_errors.round_too_large(s.run_id, self.backend, record, size)
            log.error("%s", error)
            self.backend.close_run()
            self.backend.retract(self.node_id, self.target)
            raise error
        # Our view of the nodes ended at `nodes_cursor` (or later, as the feed delivered): the
        # backend records where members start watching.
        sealed = self.backend.seal(control, record, nodes, self.node_id, nodes_cursor)
        if sealed is None:
            return self.backend.read_control()[0]
        log.info("rendezvous %s: sealed round %d with %d nodes", s.run_id, self.target, sealed.world_size)
        control.sealed = sealed
        return control

    def _usable(self, view: EligibleView, nodes: Mapping[str, NodeEntry]) -> int:
        """Eligible nodes a round can take: all of them, or with segments those in whole ones."""
        if not self.segment_size:
            return len(view.eligible)
        return usable((nodes[i].info.segment for i in view.eligible), self.segment_size, self.settings.max_nodes)

    def _newcomers(self, view: EligibleView, nodes: Mapping[str, NodeEntry]) -> int | None:
        """With segments, the newcomers members make room for: only those that complete a
        whole new segment (a partial one waits as spares). None: all of them (no segments)."""
        if not self.segment_size:
            return None
        labels = (nodes[i].info.segment for i in view.eligible if i not in view.prev_ids)
        return room(labels, self.segment_size)


# A coordinator publishes its round's progress at once when what members act on changes (a
# newcomer with room, a member asking for a new round, every member back), else at most every
# PROGRESS_INTERVAL: each publish reaches every waiting and running node.
@dataclass
class _Published:
    signal: tuple[bool, bool, bool] | None = None
    counts: tuple[int, int, int, int] | None = None
    at: float = 0.0

    def publish(
        self,
        backend: Backend,
        target: int,
        view: EligibleView,
        previous: RoundRecord | None,
        nodes: Mapping[str, NodeEntry],
        now: float,
        newcomers: int | None = None,
    ) -> float:
        """Publish round `target`'s progress if due; return the seconds until it may be.
        `newcomers`: those members should make room for, when not every eligible newcomer."""
        joined, rejoining, not_back_count = len(view.eligible), view.rejoining, view.not_back
        counts = (joined, joined - rejoining if newcomers is None else newcomers, rejoining, not_back_count)
        signal = (counts[1] > 0, rejoining > 0, not_back_count == 0)
        if counts == self.counts:
            return PROGRESS_INTERVAL
        if signal == self.signal and now - self.at < PROGRESS_INTERVAL:
            return self.at + PROGRESS_INTERVAL - now
        # Names only when published: not_back scans the previous round.
        progress = RoundProgress(*counts, missing=tuple(not_back(previous, nodes, target, MISSING_SHOWN)))
        try:
            backend.publish_progress(target, progress)
        except StoreUnreachableError as exc:
            log.debug("rendezvous: progress of round %d not published: %s", target, exc)
            return 0.5  # tried again soon: the seal needs the store anyway
        self.signal, self.counts, self.at = signal, counts, now
        return PROGRESS_INTERVAL
