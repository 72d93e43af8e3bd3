"""The seal condition (rdzv.rendezvous.seal_condition.decide), case by case, without a store."""

from __future__ import annotations

import pytest

from rdzv.rendezvous.seal_condition import SealDecision, decide


def look(**given: object) -> SealDecision:
    values: dict[str, object] = dict(
        count=2, prev_done=True, live_prev=False, min_nodes=2, max_nodes=4,
        last_call=None, last_call_timeout=10.0, now=100.0,
    )
    values.update(given)
    return decide(**values)  # type: ignore[arg-type]


def test_max_nodes_present_seals_at_once_without_a_last_call() -> None:
    assert look(count=4) == SealDecision(True, None)


def test_min_nodes_present_on_a_first_formation_starts_the_last_call() -> None:
    decision = look(count=2)
    assert decision == SealDecision(False, 110.0, last_call_started=True)


def test_the_last_call_runs_until_its_end_then_seals() -> None:
    assert look(count=3, last_call=110.0, now=109.9) == SealDecision(False, 110.0)
    assert look(count=3, last_call=110.0, now=110.0) == SealDecision(True, 110.0)


def test_a_re_formation_with_previous_members_back_pays_no_last_call() -> None:
    assert look(count=2, live_prev=True) == SealDecision(True, None)


@pytest.mark.parametrize("count", [2, 4])
def test_nothing_seals_while_a_live_previous_member_still_runs_the_old_round(count: int) -> None:
    assert look(count=count, prev_done=False, last_call=105.0) == SealDecision(False, None)


def test_too_few_nodes_end_a_running_last_call() -> None:
    assert look(count=1, last_call=105.0) == SealDecision(False, None)


def test_a_running_last_call_is_not_restarted_by_another_look() -> None:
    assert look(count=3, last_call=105.0, now=101.0) == SealDecision(False, 105.0)

