"""Deterministic node-rank assignment.

Order of precedence: a node keeps the rank it had in the previous round when that rank still
exists; then a free rank hint (``--node-rank``) is honoured; the rest fill the free ranks in
natural host order (node7 before node66), then pid, then node id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers by value: node7 < node66 < node100."""
    parts: list[tuple[int, int | str]] = []
    for chunk in _DIGITS.split(text):
        if not chunk:
            continue
        parts.append((0, int(chunk)) if chunk.isdigit() else (1, chunk.lower()))
    return tuple(parts)


@dataclass(frozen=True)
class RankCandidate:
    node_id: str
    host: str
    pid: int
    rank_hint: int | None = None


def assign_ranks(
    members: Iterable[RankCandidate], previous: Mapping[str, int] | None = None
) -> list[str]:
    """Return node ids in rank order (index = node rank)."""
    nodes = sorted(members, key=lambda m: (natural_key(m.host), m.pid, m.node_id))
    size = len(nodes)
    ranks: list[str | None] = [None] * size
    placed: set[str] = set()

    for node in nodes:  # stability first: keep last round's rank when it still fits
        rank = (previous or {}).get(node.node_id)
        if rank is not None and rank < size and ranks[rank] is None:
            ranks[rank] = node.node_id
            placed.add(node.node_id)
    for node in nodes:  # then explicit hints, first come in natural order wins a contested rank
        hint = node.rank_hint
        if node.node_id not in placed and hint is not None and hint < size and ranks[hint] is None:
            ranks[hint] = node.node_id
            placed.add(node.node_id)
    rest = iter(n.node_id for n in nodes if n.node_id not in placed)
    return [slot if slot is not None else next(rest) for slot in ranks]
