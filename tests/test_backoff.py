"""The retry pauses (rdzv.backoff.Backoff): bounds, full jitter, the cap, the floor, deadlines."""

from __future__ import annotations

import random
import time

import pytest

from rdzv.backoff import Backoff


def test_pauses_stay_below_a_cap_that_doubles_up_to_most() -> None:
    backoff = Backoff(0.5, 5.0)
    caps = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    for cap in caps:
        assert backoff.cap == cap
        assert 0.0 <= backoff.pause() <= cap
    assert backoff.cap == 5.0


def test_full_jitter_spreads_pauses_over_the_whole_range() -> None:
    random.seed(7)
    drawn = []
    for _ in range(2000):
        backoff = Backoff(1.0, 1.0)
        drawn.append(backoff.pause())
    assert min(drawn) < 0.05 and max(drawn) > 0.95  # from ~0, not from half the cap
    assert 0.45 < sum(drawn) / len(drawn) < 0.55


def test_floor_is_a_fraction_of_the_current_cap() -> None:
    backoff = Backoff(0.5, 5.0, floor=0.1)
    for _ in range(50):
        cap = backoff.cap
        assert cap / 10 <= backoff.pause() <= cap


def test_reset_starts_again_from_first() -> None:
    backoff = Backoff(0.05, 1.0)
    for _ in range(10):
        backoff.pause()
    assert backoff.cap == 1.0
    backoff.reset()
    assert backoff.cap == 0.05


def test_sleep_is_cut_at_the_deadline_and_skipped_past_it() -> None:
    slept: list[float] = []
    backoff = Backoff(10.0, 10.0, floor=1.0)
    assert backoff.sleep(sleep=slept.append) == 10.0
    cut = backoff.sleep(time.monotonic() + 0.2, sleep=slept.append)
    assert 0.0 < cut <= 0.2
    assert backoff.sleep(time.monotonic() - 1.0, sleep=slept.append) == 0.0
    assert slept == [10.0, cut]  # nothing slept past the deadline


@pytest.mark.parametrize(("first", "most", "floor"), [(0.0, 1.0, 0.0), (2.0, 1.0, 0.0), (1.0, 2.0, 1.5)])
def test_nonsense_bounds_are_refused(first: float, most: float, floor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(first, most, floor=floor)
