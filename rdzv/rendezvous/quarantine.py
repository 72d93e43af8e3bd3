"""Quarantine: a node that keeps failing the group is set aside for a while.

What is charged to a node: a counted restart (a member's workers failed with every member of
the round still there, `rdzv.rendezvous.sealing`) is charged to the member whose failure report
reached the store first: the earliest announcement of the next round carrying `failed` (the
node whose workers failed first; usually the only one, since the others are restarted as a
membership change when it rejoins). A failure while a member of the round is gone is the
departure's and charged to no one, so a node failing because another left is never
quarantined. The sealed round carries the host charged last (`blame`) and how many counted
restarts in a row were charged to it (`strikes`); a restart charged to another host starts a
new count, rounds without a counted restart leave it as it is.

When the count reaches `quarantine_after` (K, from --rdzv-conf; 0, the default, is off), the
coordinator writes a record under the run's prefix (`QuarantineBoard`): host, reason, until
(now + `quarantine_ttl`), and seals the round without that host's nodes: a spare takes its
place (and its rank), an elastic group goes on smaller. A quarantined node does not announce
itself; it waits, saying so once, until the record expires or an operator removes it
(`rdzv quarantine release`), then joins again with a fresh count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from rdzv.rendezvous.decoding import RecordError
from rdzv.rendezvous.records import NodeEntry, RoundRecord
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings, config_number

if TYPE_CHECKING:  # annotations only: rdzv status reads records without torch
    from rdzv.backends.api import Backend, QuarantineBoard

log = logging.getLogger("rdzv")

DEFAULT_TTL = 1800.0  # seconds: long enough to drain a bad node, short enough to retry it today
POLL = 2.0  # seconds between looks of a quarantined node at its record
MAX_RECORD = 4096


def host_key(host: str) -> str:
    """A host as a key name: no '/', nothing a store would read specially."""
    return urllib.parse.quote(host, safe="")


def host_of(name: str) -> str | None:
    """The host a key name holds (None: not one `host_key` writes)."""
    host = urllib.parse.unquote(name)
    return host if host and host_key(host) == name else None


@dataclass(frozen=True)
class QuarantineRecord:
    """One host set aside: why, until when (wall clock), from which round on."""

    host: str
    reason: str
    until: float
    round: int
    strikes: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> QuarantineRecord:
        if len(raw) > MAX_RECORD:
            raise RecordError(f"{len(raw)} bytes, more than a quarantine record has")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RecordError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise RecordError("not a JSON object")
        host, reason, until = doc.get("host"), doc.get("reason"), doc.get("until")
        round_no, strikes = doc.get("round"), doc.get("strikes")
        if not isinstance(host, str) or not host or not isinstance(reason, str):
            raise RecordError("'host' and 'reason' must be strings")
        if not isinstance(until, (int, float)) or isinstance(until, bool):
            raise RecordError("'until' must be a time")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (round_no, strikes)):
            raise RecordError("'round' and 'strikes' must be whole numbers")
        return cls(host, reason, float(until), round_no, strikes)  # type: ignore[arg-type]

    def describe(self) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.until))
        return f"quarantined until {until} ({max(self.until - time.time(), 0):.0f} s): {self.reason}"


@dataclass(frozen=True)
class QuarantinePolicy:
    after: int = 0  # consecutive counted restarts charged to one host that quarantine it (0: off)
    ttl: float = DEFAULT_TTL

    @property
    def enabled(self) -> bool:
        return self.after > 0

    @classmethod
    def from_settings(cls, settings: RendezvousSettings) -> QuarantinePolicy:
        return cls.from_config(settings.config)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> QuarantinePolicy:
        """From --rdzv-conf (torch-free: rdzv-launch asks before it loads torch)."""
        raw = config.get("quarantine_after")
        after = 0 if raw in (None, "") else int(str(raw))  # checked: a whole number >= 0
        ttl = config_number(config, "quarantine_ttl")
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"rendezvous setting quarantine_ttl={ttl:g} must be > 0 seconds")
        return cls(after, DEFAULT_TTL if ttl is None else ttl)


def charged_host(
    previous: RoundRecord | None, reports: Iterable[NodeEntry], live_prev: Iterable[str]
) -> str | None:
    """The host a counted restart is charged to: of the live members of `previous` whose
    records say their workers failed in it, the one that said so first (smallest arrival).
    None: no member reported a failure. The caller decides whether the restart counts at all
    (not when a member departed)."""
    if previous is None:
        return None
    live = set(live_prev)
    failed = [e for e in reports if e.info.failed == previous.round and e.info.node_id in live]
    return min(failed, key=lambda e: e.arrival).info.host if failed else None


def carried_count(previous: RoundRecord | None, charged: str | None) -> tuple[str, int]:
    """(`blame`, `strikes`) of the next round: one more for the same host, a new count for
    another, unchanged without a charge."""
    blame, strikes = (previous.blame, previous.strikes) if previous is not None else ("", 0)
    if charged is None:
        return blame, strikes
    return charged, strikes + 1 if charged == blame else 1


def active(board: QuarantineBoard, now: float | None = None) -> dict[str, QuarantineRecord]:
    """The records on `board` still in force, by host. One that does not decode is ignored
    (with one warning): a hand-written key must not keep a node out."""
    now = time.time() if now is None else now
    records = {}
    for host, raw in board.read().items():
        try:
            record = QuarantineRecord.decode(raw)
        except RecordError as exc:
            log.warning("rendezvous: ignoring the quarantine record of %s: %s", host, exc)
            continue
        if record.until > now:
            records[host] = record
    return records


class Quarantine:
    """One node's use of the quarantine: the coordinator's verdicts, a node's own check."""

    def __init__(self, policy: QuarantinePolicy, board: QuarantineBoard | None, run_id: str) -> None:
        self.policy = policy
        self.board = board if policy.enabled else None
        self.run_id = run_id

    @classmethod
    def for_backend(cls, settings: RendezvousSettings, backend: Backend) -> Quarantine:
        """The quarantine `settings` ask for, on `backend`'s board; a ConfigError where it
        does not apply (static)."""
        policy = QuarantinePolicy.from_settings(settings)
        board = backend.quarantine_board() if policy.enabled else None
        if policy.enabled and board is None:
            raise ConfigError(
                f"rendezvous setting quarantine_after: the {backend.name} backend's group is "
                "fixed, so it cannot go on without a quarantined node"
            )
        return cls(policy, board, settings.run_id)

    @property
    def enabled(self) -> bool:
        return self.board is not None

    def hosts_out(self) -> dict[str, QuarantineRecord]:
        """Hosts quarantined now (one read; nothing when off)."""
        return active(self.board) if self.board is not None else {}

    def verdict(self, record: RoundRecord, out: dict[str, QuarantineRecord]) -> str | None:
        """The host `record` quarantines: its restarts' charged host, once charged K in a row."""
        if self.board is None or record.strikes < self.policy.after or not record.blame:
            return None
        return None if record.blame in out else record.blame

    def settled(self, record: RoundRecord, out: dict[str, QuarantineRecord]) -> RoundRecord:
        """`record` as sealed: a quarantined host's count ends with its quarantine (back, it
        starts afresh)."""
        return dataclasses.replace(record, blame="", strikes=0) if record.blame in out else record

    def impose(self, host: str, record: RoundRecord) -> QuarantineRecord:
        assert self.board is not None
        entry = QuarantineRecord(
            host=host,
            reason=(
                f"workers failed in {record.strikes} counted restarts in a row charged to this "
                f"node (quarantine_after={self.policy.after}), the last in round {record.round - 1}"
            ),
            until=time.time() + self.policy.ttl,
            round=record.round,
            strikes=record.strikes,
        )
        self.board.put(host, entry.encode(), self.policy.ttl)
        log.warning("rendezvous %s: node %s %s", self.run_id, host, entry.describe())
        return entry

    def blocking(self, host: str) -> QuarantineRecord | None:
        """This host's record in force, if any (one read)."""
        return self.hosts_out().get(host) if self.board is not None else None

    def sit_out(self, host: str, leave: Callable[[], None], stop: Callable[[], bool]) -> bool:
        """While `host` is quarantined, `leave()` the group (no record of ours: the group
        neither waits for us nor counts us as a newcomer) and wait until it ends (`stop()`:
        give up now, e.g. the run closed). Whether there was anything to wait for (one read)."""
        record = self.blocking(host)
        if record is None:
            return False
        leave()
        log.warning("rendezvous %s: this node (%s) is %s; waiting", self.run_id, host, record.describe())
        current: QuarantineRecord | None = record
        while current is not None and not stop():
            time.sleep(max(min(POLL, current.until - time.time()), 0.05))
            current = self.blocking(host)
        log.warning("rendezvous %s: this node (%s) is out of quarantine; joining again", self.run_id, host)
        return True
