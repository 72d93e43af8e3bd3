"""Rendezvous events of one run, derived from the changes of its keys (`rdzv.view.Change`).

node joined, node asks for a new round, node left / lost, last call started, round sealed, run
closed, run removed, node quarantined / released, and keys that do not decode. JSON lines carry torch's `RdzvEvent` field
names where they fit (name, run_id, message, hostname, pid, node_state, master_endpoint, rank,
local_id, error_trace) plus ours (round, members, ts, node_id, seconds, replayed). Torch-free:
`node_state` holds the names of torch's `NodeState` values as plain strings.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from rdzv.inspect import CLOSED, LASTCALL, RunKey
from rdzv.rendezvous.records import NodeInfo, RoundRecord
from rdzv.view import Change, RunView

# torch.distributed.elastic.events.api.NodeState values
INIT, RUNNING, SUCCEEDED, FAILED = "INIT", "RUNNING", "SUCCEEDED", "FAILED"

NODE_JOINED = "node_joined"
NODE_WAITING = "node_waiting"
NODE_LEFT = "node_left"
NODE_LOST = "node_lost"
LAST_CALL = "last_call_started"
ROUND_SEALED = "round_sealed"
RUN_CLOSED = "run_closed"
RUN_REMOVED = "run_removed"
CORRUPT_KEY = "corrupt_key"
NODE_QUARANTINED = "node_quarantined"
NODE_RELEASED = "node_released"


@dataclass
class RunEvent:
    """One event; the first ten fields are torch's RdzvEvent's."""

    name: str
    run_id: str
    message: str
    hostname: str = ""
    pid: int | None = None
    node_state: str = RUNNING
    master_endpoint: str = ""
    rank: int | None = None
    local_id: int | None = None
    error_trace: str = ""
    round: int | None = None
    members: list[dict[str, Any]] | None = None  # round_sealed: rank, node_id, host, pid, ...
    ts: float = 0.0  # when this process saw it (seconds since the epoch)
    node_id: str | None = None
    seconds: float | None = None  # node_left/lost: time in the run; round_sealed: time taken;
    # last_call_started: time left
    replayed: bool = False  # read from the keys as they were, not seen as it happened

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def to_text(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.ts))
        return f"{stamp}.{int(self.ts * 1000) % 1000:03d}  {self.run_id}  {self.message}"


NAMES_SHOWN = 8  # members named in a round's message (the JSON lists all)


def _secs(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}s" if value < 10 else f"{value:.1f}s"


class EventDeriver:
    """Turns the changes of one run's view into events (call after `view.apply`)."""

    def __init__(self, view: RunView) -> None:
        self.view = view

    def derive(self, change: Change) -> list[RunEvent]:
        events = self._derive(change.old, change.new, change.at)
        if change.old is not None and self.view.empty:
            how = "after the run was closed" if self.view.ever_closed else "without a close (its nodes are gone)"
            events.append(self._event(RUN_REMOVED, f"every key of the run is gone, {how}", change.at,
                                      node_state=SUCCEEDED if self.view.ever_closed else FAILED))
        for event in events:
            event.replayed = not change.live
        return events

    def _event(self, name: str, message: str, at: float, **fields: Any) -> RunEvent:
        return RunEvent(name, self.view.run_id, message, ts=round(at, 3), **fields)

    def _derive(self, old: RunKey | None, new: RunKey | None, at: float) -> list[RunEvent]:
        if new is not None and new.error is not None:
            if old is not None and old.error == new.error:
                return []
            return [self._event(CORRUPT_KEY, f"{new.key} does not hold what the handler writes: {new.error}",
                                at, node_state=FAILED, error_trace=new.error)]
        if (new is not None and new.quarantine is not None) or (old is not None and old.quarantine is not None):
            return self._quarantine(old, new, at)
        if new is not None and new.node is not None:
            return self._node_put(old.node if old is not None else None, new.node, at)
        if new is None and old is not None and old.node is not None:
            return [self._node_gone(old.node, at)]
        if new is not None and new.sealed is not None:
            if old is not None and old.sealed is not None and old.sealed.round == new.sealed.round:
                return []
            # With its members: a header's are in the keys written before it.
            return [self._sealed(self.view.sealed or new.sealed, at)]
        if new is not None and new.kind == LASTCALL and old is None and new.deadline is not None:
            left = max(new.deadline - at, 0.0)
            return [self._event(LAST_CALL, f"last call for round {new.round_no}: {_secs(left)} left",
                                at, node_state=INIT, round=new.round_no, seconds=round(left, 3))]
        if new is not None and new.kind == CLOSED and old is None:
            return [self._event(RUN_CLOSED, "run closed: no new rounds; its nodes are leaving", at,
                                node_state=SUCCEEDED, round=self._round())]
        return []

    def _quarantine(self, old: RunKey | None, new: RunKey | None, at: float) -> list[RunEvent]:
        if new is not None and new.quarantine is not None:
            q = new.quarantine
            return [self._event(NODE_QUARANTINED, f"node {q.host} {q.describe()}", at, node_state=FAILED,
                                hostname=q.host, round=q.round, seconds=round(max(q.until - at, 0.0), 3))]
        q = old.quarantine  # type: ignore[union-attr]  # one of the two holds a record
        assert q is not None
        how = "released by an operator" if q.until > at + 1 else "its quarantine ended"
        return [self._event(NODE_RELEASED, f"node {q.host} out of quarantine: {how}; it may join again", at,
                            node_state=INIT, hostname=q.host, round=self._round())]

    def _round(self) -> int | None:
        sealed = self.view.sealed
        return sealed.round if sealed is not None else None

    def _node_fields(self, info: NodeInfo) -> dict[str, Any]:
        sealed = self.view.sealed
        return {"hostname": info.host, "pid": info.pid, "node_id": info.node_id,
                "rank": sealed.rank_of(info.node_id) if sealed is not None else None}

    def _node_put(self, old: NodeInfo | None, info: NodeInfo, at: float) -> list[RunEvent]:
        who = f"{self.view.name(info.node_id)} (pid {info.pid})"
        if old is None:
            return [self._event(NODE_JOINED, f"node {who} joined, asking for round {info.want}", at,
                                node_state=INIT, round=info.want, **self._node_fields(info))]
        if info.want > old.want:
            return [self._event(NODE_WAITING, f"node {who} asks for round {info.want}", at,
                                node_state=INIT, round=info.want, **self._node_fields(info))]
        return []

    def _node_gone(self, info: NodeInfo, at: float) -> RunEvent:
        view = self.view
        sealed = view.sealed
        joined = view.joined_at.get(info.node_id)
        stayed = None if joined is None else round(at - joined, 3)
        after = f" after {_secs(stayed)}" if stayed is not None else ""
        who = f"{view.name(info.node_id)} (pid {info.pid})"
        fields = self._node_fields(info)
        if sealed is not None and fields["rank"] is not None and not view.closed:
            return self._event(NODE_LOST, f"node {who} lost{after}: rank {fields['rank']} of round "
                               f"{sealed.round}, its record expired or was removed", at,
                               node_state=FAILED, round=sealed.round, seconds=stayed, **fields)
        return self._event(NODE_LEFT, f"node {who} left{after}", at, node_state=SUCCEEDED,
                           round=self._round(), seconds=stayed, **fields)

    def _sealed(self, sealed: RoundRecord, at: float) -> RunEvent:
        view = self.view
        nodes = view.nodes()
        hosts = view.hosts()
        members = []
        for rank, nid in enumerate(sealed.ids):
            info = nodes.get(nid) or view.known.get(nid)
            members.append({
                "rank": rank, "node_id": nid, "host": hosts.get(nid),
                "pid": info.pid if info else None,
                "local_world_size": info.local_world_size if info else None,
            })
        started = view.round_started.get(sealed.round)
        took = None if started is None else round(max(at - started, 0.0), 3)
        shown = view.names(sealed.ids[:NAMES_SHOWN])
        names = ", ".join(f"{rank}={name}" for rank, name in enumerate(shown))
        if len(sealed.ids) > NAMES_SHOWN:
            names += f", ... ({len(sealed.ids) - NAMES_SHOWN} more)"
        in_time = f" in {_secs(took)} from its first join" if took is not None else ""
        master = f"{sealed.master_addr}:{sealed.master_port}"
        return self._event(
            ROUND_SEALED,
            f"round {sealed.round} sealed{in_time}: {sealed.world_size} node(s) "
            f"(min {sealed.min_nodes}, max {sealed.max_nodes}) {names}; master {master}",
            at, node_state=RUNNING, master_endpoint=master, round=sealed.round, members=members,
            seconds=took,
        )
