"""Pauses between the tries of a retry loop: random below a doubling cap ("full jitter").

Every retry loop in rdzv draws its pauses here, so that clients turned away together (etcd
back from an outage, a busy etcd shedding load) do not all come back together. Pause n is
uniform(floor * cap_n, cap_n) with cap_n = min(most, first * 2**n); floor 0 is AWS's "full
jitter". Torch-free: the etcd client uses it as well as the backends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """The pauses of one retry loop: make one per loop (or per call), `reset` after a success."""

    def __init__(
        self, first: float, most: float, *, floor: float = 0.0, rng: random.Random | None = None
    ) -> None:
        if not 0.0 < first <= most:
            raise ValueError(f"backoff needs 0 < first <= most, got first={first}, most={most}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"backoff floor is a fraction of the cap in [0, 1], got {floor}")
        self.first = first
        self.most = most
        self.floor = floor
        self.cap = first
        self._uniform = (rng or random).uniform  # a seeded Random makes tests repeatable

    def pause(self) -> float:
        """The next pause in seconds; the cap doubles (up to `most`) for the one after."""
        drawn = self._uniform(self.floor * self.cap, self.cap)
        self.cap = min(self.cap * 2, self.most)
        return drawn

    def reset(self) -> None:
        """Start again from `first`: the last try worked, the next failure is a new spell."""
        self.cap = self.first

    def sleep(
        self, deadline: float | None = None, *, sleep: Callable[[float], None] = time.sleep
    ) -> float:
        """Sleep the next pause, cut short at the monotonic `deadline` (none at or past it);
        return the seconds slept."""
        pause = self.pause()
        if deadline is not None:
            pause = min(pause, deadline - time.monotonic())
        if pause <= 0:
            return 0.0
        sleep(pause)
        return pause
