"""In-memory views of runs, folded from etcd key events (a snapshot is a batch of PUTs).

`RunView` holds one run's keys, decoded by `rdzv.inspect.decode_key`, and the times at which
this process saw things happen (etcd keeps no clocks): when a node's record appeared, when a
round's first node asked for it, when the round was sealed. `PrefixView` holds every run under
a prefix. Neither talks to etcd (see `rdzv.keyfeed`) nor imports torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rdzv.etcd import Event
from rdzv.inspect import (
    CLOSED,
    COORD,
    RunKey,
    decode_key,
    norm_prefix,
    run_root,
    summarize,
    with_members,
)
from rdzv.rendezvous.records import NodeInfo, RoundRecord

KEEP_ROUNDS = 8  # rounds whose start times are remembered (for "sealed in N s")
KEEP_DEPARTED = 4096  # departed nodes remembered by id (for their host names)


@dataclass(frozen=True)
class Change:
    """One key of a run changed: `old`/`new` are its decoded values (None: absent)."""

    run_id: str
    old: RunKey | None
    new: RunKey | None
    at: float  # when this process learned of it (time.time())
    live: bool  # seen by the watch (False: read from a snapshot, when it happened is unknown)


class RunView:
    """One run's keys and what this process saw of their history."""

    def __init__(self, run_id: str, root: str, since: float) -> None:
        self.run_id = run_id
        self.root = root  # `<prefix>/<run_id>/`
        self.since = since  # when this view started: the lower bound of every unknown time
        self.keys: dict[str, RunKey] = {}
        self.known: dict[str, NodeInfo] = {}  # the last record of every node seen, gone ones too
        self.joined_at: dict[str, float] = {}  # node id -> when its record appeared (seen live)
        self.round_started: dict[int, float] = {}  # round -> when its first node asked (live)
        self.sealed_at: float | None = None  # when the current round was sealed (seen live)
        self.ever_closed = False
        self._sealed: tuple[RunKey, RoundRecord | None] | None = None  # (ctl/current key, its record)

    # -- folding ---------------------------------------------------------------------------

    def apply(self, event: Event, at: float, live: bool = True) -> Change:
        key = event.kv.key.decode(errors="replace")
        rel = key[len(self.root) :]
        old = self.keys.get(rel)
        new = decode_key(key, rel, event.kv) if event.type == "PUT" else None
        if new is None:
            self.keys.pop(rel, None)
        else:
            self.keys[rel] = new
        self._note(old, new, at if live else None)
        return Change(self.run_id, old, new, at, live)

    def _note(self, old: RunKey | None, new: RunKey | None, at: float | None) -> None:
        if new is not None and new.node is not None:
            info = new.node
            self.known.pop(info.node_id, None)
            self.known[info.node_id] = info  # re-inserted: the newest last, for pruning
            if old is None or old.node is None:
                self._stamp(self.joined_at, info.node_id, at)
            if len(self.known) > KEEP_DEPARTED:
                self._forget_departed()
        elif new is not None and new.kind == COORD and new.round_no is not None:
            if new.round_no not in self.round_started:
                self._stamp(self.round_started, new.round_no, at)
            for stale in sorted(self.round_started)[:-KEEP_ROUNDS]:
                del self.round_started[stale]
        elif new is not None and new.sealed is not None:
            if old is None or old.sealed is None or old.sealed.round != new.sealed.round:
                self.sealed_at = at
        elif new is not None and new.kind == CLOSED and new.error is None:
            self.ever_closed = True

    def _forget_departed(self) -> None:
        departed = [nid for nid in self.known if f"node/{nid}" not in self.keys]
        for nid in departed[: len(self.known) - KEEP_DEPARTED]:
            self.known.pop(nid)
            self.joined_at.pop(nid, None)

    @staticmethod
    def _stamp(times: dict[Any, float], key: object, at: float | None) -> None:
        if at is None:
            times.pop(key, None)
        else:
            times[key] = at

    # -- reading ---------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not self.keys

    @property
    def sealed(self) -> RoundRecord | None:
        """The sealed round, with its members (read from its member keys for a header)."""
        current = self.keys.get("ctl/current")
        if current is None or current.sealed is None:
            return None
        cached = self._sealed
        if cached is None or cached[0] is not current:
            # Members' keys are all written before the header: one pass per header.
            cached = self._sealed = (current, with_members(current.sealed, self.keys.values()))
        return cached[1]

    @property
    def closed(self) -> bool:
        closed = self.keys.get("ctl/closed")
        return closed is not None and closed.error is None

    def nodes(self) -> dict[str, NodeInfo]:
        """The node records that decode, by node id."""
        return {rk.node.node_id: rk.node for rk in self.keys.values() if rk.node is not None}

    def hosts(self) -> dict[str, str]:
        """The host of every node this view knows: from node records (departed ones too) and
        from the sealed round's record."""
        hosts = {nid: info.host for nid, info in self.known.items()}
        sealed = self.sealed
        listed = getattr(sealed, "hosts", ())  # records of older versions name no hosts
        if sealed is not None and len(listed) == len(sealed.ids):
            hosts.update(zip(sealed.ids, listed, strict=True))
        return hosts

    def names(self, node_ids: Iterable[str]) -> list[str]:
        """How to name nodes to a person: by host, with the id where another node (present or
        of the sealed round) has the same host."""
        hosts = self.hosts()
        sealed = self.sealed
        present = set(self.nodes()) | set(sealed.ids if sealed is not None else ())
        counts = Counter(hosts[nid] for nid in present if nid in hosts)
        named = []
        for nid in node_ids:
            host = hosts.get(nid)
            if host is None:
                named.append(nid)
            else:
                others = counts[host] - (nid in present)
                named.append(f"{host}[{nid}]" if others else host)
        return named

    def name(self, node_id: str) -> str:
        return self.names([node_id])[0]

    def describe(self, now: float) -> dict[str, Any]:
        """`rdzv status --rdzv-id` of this run (no lease times: a watch does not see them), plus
        what only a watch knows: the round's age, the round forming, who asked for it, its last
        call, who of the previous round is not back yet and the host names of lost members."""
        desc = summarize(self.run_id, self.keys.values())
        sealed = self.sealed
        forming = self.forming_round()
        desc["round_age"] = None if sealed is None else now - (self.sealed_at or self.since)
        desc["round_age_exact"] = sealed is not None and self.sealed_at is not None
        desc["forming"] = forming
        desc["last_call_left"] = self.last_call_left(forming, now)
        desc["lost_hosts"] = self.names(desc["lost_members"])
        desc["asking"] = self.names(
            nid for nid, info in self.nodes().items() if forming and info.want >= forming
        )
        desc["not_back"] = self.not_back(forming)
        return desc

    def forming_round(self) -> int | None:
        """The round being formed: one asked for beyond the sealed round by a member, or by a
        node that is not a spare (spares of a full group wait for a departure, forming nothing)."""
        sealed = self.sealed
        if self.closed:
            return None
        done = sealed.round if sealed is not None else 0
        open_to_all = sealed is None or not sealed.full
        asked = [
            info.want
            for nid, info in self.nodes().items()
            if info.want > done and (open_to_all or nid in sealed.ids)
        ]
        return max(asked) if asked else None

    def last_call_left(self, forming: int | None, now: float) -> float | None:
        """Seconds left of the forming round's last call (None: none running)."""
        if forming is None:
            return None
        for rk in self.keys.values():
            if rk.round_no == forming and rk.deadline is not None:
                return max(rk.deadline - now, 0.0)
        return None

    def not_back(self, forming: int | None) -> list[str]:
        """Members of the sealed round that have not asked for the forming round, by name."""
        sealed = self.sealed
        if forming is None or sealed is None:
            return []
        nodes = self.nodes()
        return self.names(nid for nid in sealed.ids if nid not in nodes or nodes[nid].want < forming)


class PrefixView:
    """Every run under a prefix, from the events of one watch of the prefix."""

    def __init__(self, prefix: str, since: float) -> None:
        self.prefix = norm_prefix(prefix)
        self.root = self.prefix + "/"
        self.since = since
        self.runs: dict[str, RunView] = {}

    def apply(self, event: Event, at: float, live: bool = True) -> Change | None:
        """Fold one event; None for a key that belongs to no run (right under the prefix)."""
        rel = event.kv.key.decode(errors="replace")[len(self.root) :]
        run_id, sep, _ = rel.partition("/")
        if not sep or not run_id:
            return None
        view = self.runs.get(run_id)
        if view is None:
            if event.type != "PUT":
                return None
            view = self.runs[run_id] = RunView(run_id, run_root(self.prefix, run_id), at)
        change = view.apply(event, at, live)
        if view.empty:
            del self.runs[run_id]  # a run is its keys: none left, no run
        return change

