"""Rounds made of whole segments: nodes that share an NVLink domain (one segment label) and get
contiguous ranks.

With `segment_size=S` (`--rdzv-conf`), a round holds only whole segments of S nodes of one
label; nodes left over from a partial segment wait as spares. A lost member breaks its segment:
the next round takes that segment only if a spare of the same label completes it again. A node
without a label is in the unlabelled segment ("" here), so `segment_size` alone groups nodes in
runs of S. Without `segment_size` nothing here is used.

Everything here is a pure function of ids, hosts, labels and previous ranks (no store, no
torch): `rdzv.rendezvous.sealing` orders a round with `segment_order`, the coordinator counts
with `usable`, members count newcomers with `room`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rdzv.rendezvous.ranks import natural_key
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings

UNLABELLED = ""


def segment_size(settings: RendezvousSettings) -> int:
    """`segment_size` from --rdzv-conf (0: off); see `check_segment_size`."""
    return check_segment_size(settings.config, settings.min_nodes, settings.max_nodes)


def check_segment_size(config: Mapping[str, object], min_nodes: int, max_nodes: int) -> int:
    """`segment_size` in `config` (0: off). A size with which no round could ever form is a
    ConfigError naming it (torch-free: rdzv-launch asks before it loads torch)."""
    raw = config.get("segment_size")
    if raw is None or raw == "":
        return 0
    size = int(str(raw))  # check_config made sure it is a whole number >= 0
    if size == 0:
        return 0
    if size > max_nodes or effective_max(max_nodes, size) < min_nodes:
        raise ConfigError(
            f"rendezvous setting segment_size={size}: rounds are whole segments, and no multiple "
            f"of {size} lies between min nodes {min_nodes} and max nodes {max_nodes}"
        )
    return size


def segment_label(settings: RendezvousSettings) -> str | None:
    """This node's label (`segment` in --rdzv-conf; rdzv-launch passes --node-segment)."""
    raw = settings.config.get("segment")
    return str(raw) if raw not in (None, "") else None


def effective_max(max_nodes: int, size: int) -> int:
    """The largest round of whole segments: max_nodes rounded down to a multiple of `size`."""
    return max_nodes - max_nodes % size if size else max_nodes


@dataclass(frozen=True)
class SegmentCandidate:
    node_id: str
    host: str
    pid: int
    label: str | None = None


def _by_label(candidates: Iterable[SegmentCandidate]) -> dict[str, list[SegmentCandidate]]:
    groups: dict[str, list[SegmentCandidate]] = defaultdict(list)
    for c in candidates:
        groups[c.label or UNLABELLED].append(c)
    return groups


def usable(labels: Iterable[str | None], size: int, max_nodes: int) -> int:
    """How many of the nodes with these labels a round can take: whole segments only, at most
    `effective_max(max_nodes)`. O(N); the coordinator asks once per wake-up."""
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label or UNLABELLED] += 1
    whole = sum(n - n % size for n in counts.values())
    return min(whole, effective_max(max_nodes, size))


def room(newcomer_labels: Iterable[str | None], size: int) -> int:
    """Newcomers a running round could take: members fill whole segments, so a new segment
    needs `size` newcomers of one label (a partial one never makes the group restart)."""
    counts: dict[str, int] = defaultdict(int)
    for label in newcomer_labels:
        counts[label or UNLABELLED] += 1
    return sum(n - n % size for n in counts.values())


def segment_order(
    candidates: Sequence[SegmentCandidate],
    size: int,
    max_nodes: int,
    previous: Mapping[str, int] | None = None,
) -> list[str]:
    """Node ids in rank order for a round of whole segments of `size`, at most
    `effective_max(max_nodes, size)` nodes. `candidates` come in order of preference (previous
    members first, then by arrival): each label's first nodes in that order fill its segments.
    Segments are ordered by the lowest rank a member had in the previous round (they keep their
    place), then by natural host order; within a segment, previous ranks first, then natural
    host order, pid and id. Ranks are contiguous within each segment."""
    previous = previous or {}
    chunks: list[list[SegmentCandidate]] = []
    for members in _by_label(candidates).values():
        whole = len(members) - len(members) % size
        chunks.extend(members[i : i + size] for i in range(0, whole, size))

    def placed(c: SegmentCandidate) -> tuple[float, tuple[tuple[int, int | str], ...], int, str]:
        return (previous.get(c.node_id, math.inf), natural_key(c.host), c.pid, c.node_id)

    chunks = [sorted(chunk, key=placed) for chunk in chunks]
    # Which segments: those holding previous members first (warm state), in their old order.
    chunks.sort(key=lambda chunk: placed(chunk[0]))
    chunks = chunks[: effective_max(max_nodes, size) // size]
    return [c.node_id for chunk in chunks for c in chunk]
