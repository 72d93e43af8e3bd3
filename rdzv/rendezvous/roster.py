"""Who is in a sealed round, by rank: the `Roster` views a `RoundRecord` answers through
(inline in the record, or read on demand from the store where members are stored apart)."""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rdzv.rendezvous.decoding import RecordError

if TYPE_CHECKING:
    from rdzv.rendezvous.records import Assignment


class Roster(Protocol):
    """Who is in a sealed round, by rank. Inline (`InlineRoster`) where the record lists every
    member; read on demand from the store where it does not (etcd v3: one key per member, so a
    member reads one key, not the whole round). Lookups may then raise the backend's
    connection errors."""

    def rank_of(self, node_id: str) -> int | None: ...

    def name_of(self, node_id: str) -> str: ...

    def ids(self) -> tuple[str, ...]: ...

    def hosts(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class InlineRoster:
    """Every member's id and host, in rank order."""

    listed: tuple[str, ...]
    host_names: tuple[str, ...] = ()  # empty in records of older versions

    @classmethod
    def of(cls, members: Mapping[str, Assignment]) -> InlineRoster:
        """The roster of the members' assignments (stored apart), in rank order."""
        ordered = sorted(members.items(), key=lambda item: item[1].rank)
        return cls(tuple(i for i, _ in ordered), tuple(a.host for _, a in ordered))

    @functools.cached_property
    def _ranks(self) -> dict[str, int]:
        # Looked up for every node of a big round: a dict, not a scan of `ids` each time.
        return {node_id: rank for rank, node_id in enumerate(self.listed)}

    @functools.cached_property
    def _host_counts(self) -> collections.Counter[str]:
        return collections.Counter(self.host_names)

    def rank_of(self, node_id: str) -> int | None:
        return self._ranks.get(node_id)

    def name_of(self, node_id: str) -> str:
        """How messages name a member: its host, with its id where hosts are not unique."""
        rank = self.rank_of(node_id)
        if rank is None or len(self.host_names) != len(self.listed):
            return node_id
        return display_name(self.host_names[rank], node_id, self._host_counts[self.host_names[rank]] > 1)

    def ids(self) -> tuple[str, ...]:
        return self.listed

    def hosts(self) -> tuple[str, ...]:
        return self.host_names


def display_name(host: str, node_id: str, shared_host: bool) -> str:
    """'host7', or 'host7[<id>]' when several members run on that host."""
    return f"{host}[{node_id}]" if shared_host else host


class DetachedRoster:
    """The roster of a round record decoded without its store: a header (`RoundRecord.HEADER`)
    until the backend that read it attaches the store's roster (`RoundRecord.with_roster`)."""

    def _missing(self) -> RecordError:
        return RecordError("a sealed-round header read without its roster")

    def rank_of(self, node_id: str) -> int | None:
        raise self._missing()

    def name_of(self, node_id: str) -> str:
        return node_id

    def ids(self) -> tuple[str, ...]:
        raise self._missing()

    def hosts(self) -> tuple[str, ...]:
        raise self._missing()
