"""When a coordinator seals its round: a pure function of what it counts, so the rule has one
home and its own tests (tests/test_seal_condition.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SealDecision:
    """`seal`: seal now. `last_call`: the last call's end (monotonic), None when none runs;
    `last_call_started`: it began with this look (the coordinator publishes it)."""

    seal: bool
    last_call: float | None
    last_call_started: bool = False


def decide(
    *,
    count: int,
    prev_done: bool,
    live_prev: bool,
    min_nodes: int,
    max_nodes: int,
    last_call: float | None,
    last_call_timeout: float,
    now: float,
) -> SealDecision:
    """Seal when no live member of the previous round still runs it (`prev_done`) and

    * `max_nodes` are present, or
    * at least `min_nodes` are present and live members of the previous round are back
      (`live_prev`: a re-formation pays no last call), or
    * at least `min_nodes` are present and the last call is over (first formation, or every
      previous member gone); the last call starts at the first look with `min_nodes` present.

    Fewer than `min_nodes` (or a previous member still running the old round) ends any last
    call: it starts afresh once enough nodes are back."""
    if not prev_done:
        return SealDecision(False, None)
    if count >= max_nodes:
        return SealDecision(True, last_call)
    if count < min_nodes:
        return SealDecision(False, None)
    if live_prev:
        return SealDecision(True, last_call)
    if last_call is None:
        return SealDecision(False, now + last_call_timeout, last_call_started=True)
    return SealDecision(now >= last_call, last_call)
