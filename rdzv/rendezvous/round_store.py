"""A round's store whose blocking reads end when a member of the round is gone.

torch's agent assigns worker ranks through the round's store right after the rendezvous: each
node posts its role info and waits for rank 0's answer. A member killed between the seal and
its post would hold the others there for the store's whole timeout (300 s), then fail them.
`GuardedRoundStore` waits in short slices and, between them, asks the handler whether a member
left (no request: the membership watch answers); if one did, the wait ends with
`RoundMemberGoneError`, which rdzv-launch's agent answers with a new rendezvous.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import DistStoreError, Store

from rdzv.backends.delegating_store import DelegatingStore
from rdzv.rendezvous.membership import Departures

# How long one slice of a blocking read lasts: the delay between a departure being seen and the
# wait ending.
SLICE = 1.0


class RoundMemberGoneError(DistStoreError):
    """A blocking read of the round's store ended because a member of the round is gone."""

    def __init__(self, round_no: int, departures: Departures, keys: list[str]) -> None:
        super().__init__(
            f"round {round_no} cannot complete: {departures.describe()} (was waiting for {_shown(keys)})"
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
        deadline = time.monotonic() + total
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistStoreError(
                    f"round {self._round}'s store: timed out after {total:g} s waiting for {_shown(keys)}"
                )
            step = min(SLICE, left)
            started = time.monotonic()
            try:
                self.inner.wait(keys, timedelta(seconds=step))
                return
            except RuntimeError as exc:  # DistStoreError, DistNetworkError
                gone = self._departures()
                if gone:
                    raise RoundMemberGoneError(self._round, gone, keys) from exc
                # A slice that ran its length timed out; anything quicker is the store failing.
                if time.monotonic() - started < 0.9 * step:
                    raise


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
