"""A round's store whose blocking reads end when a member of the round is gone.

torch's agent assigns worker ranks through the round's store right after the rendezvous: each
node posts its role info and waits for rank 0's answer. A member killed between the seal and
its post would hold the others there for the store's whole timeout (300 s), then fail them.
`GuardedRoundStore` waits one short slice for the keys, then polls for them, asking the handler
between polls whether a member left (answered from the membership watch); if one did, the wait
ends with `RoundMemberGoneError`, which rdzv-launch's agent answers with a new rendezvous.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import DistStoreError, Store

from rdzv.rendezvous.delegating_store import DelegatingStore
from rdzv.rendezvous.membership import Departures
from rdzv.rendezvous.progress import listed

# The first blocking wait, then the polling interval: the delay between a departure being seen
# and the wait ending.
SLICE = 1.0


class RoundMemberGoneError(DistStoreError):
    """A blocking read of the round's store ended because a member of the round is gone."""

    def __init__(self, round_no: int, departures: Departures, keys: list[str]) -> None:
        super().__init__(
            f"round {round_no} cannot complete: {departures.describe()} (was waiting for {listed(keys, 3)})"
        )
        self.round = round_no
        self.departures = departures


class GuardedRoundStore(DelegatingStore):
    """Delegates to the backend's round store; `get`, `multi_get` and `wait` also end when
    `departures()` names someone. Non-blocking calls pass straight through."""

    def __init__(self, inner: Store, round_no: int, departures: Callable[[], Departures]) -> None:
        super().__init__()
        self._round_store = inner
        self._round = round_no
        self._departures = departures
        self.set_timeout(inner.timeout)

    @property
    def inner(self) -> Store:
        return self._round_store

    def get(self, key: str) -> bytes:
        return self.multi_get([key])[0]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self.wait(keys)
        return self.inner.multi_get(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        total = (timeout if timeout is not None else self.timeout).total_seconds()
        # As torch's stores: a zero timeout waits without a deadline.
        deadline = time.monotonic() + total if total > 0 else math.inf
        # Usually the keys come within the first slice: one blocking, event-driven wait.
        first = min(SLICE, deadline - time.monotonic())
        started = time.monotonic()
        try:
            self.inner.wait(keys, timedelta(seconds=first))
            return
        except RuntimeError as exc:  # DistStoreError, DistNetworkError
            self._raise_if_gone(keys, exc)
            # A wait that ran its length timed out; anything quicker is the store failing.
            if time.monotonic() - started < 0.9 * first:
                raise
        # A slow peer: poll, asking about departures in between (a timed-out wait per slice
        # would cost a watch on etcd and two warning lines on a TCPStore each time).
        while not self.inner.check(keys):
            self._raise_if_gone(keys, None)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistStoreError(
                    f"round {self._round}'s store: timed out after {total:g} s waiting for {listed(keys, 3)}"
                )
            time.sleep(min(SLICE, left))

    def _raise_if_gone(self, keys: list[str], cause: BaseException | None) -> None:
        gone = self._departures()
        if gone:
            raise RoundMemberGoneError(self._round, gone, keys) from cause
