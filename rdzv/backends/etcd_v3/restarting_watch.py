"""The etcd watch under an etcd v3 feed: it hands over events until it cannot go on (history
compacted, or cancelled by etcd), then asks the feed to start over from a fresh read, at most
once a second, and reopens from the revision of that read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rdzv.backends.api import NodeChange
from rdzv.backends.common.resync import ResyncPacing
from rdzv.etcd import EtcdAuthError, EtcdClient, EtcdCompactedError, EtcdError, Event, Watch

log = logging.getLogger("rdzv")


@dataclass(frozen=True)
class StartOver:
    """The watch cannot go on (`why`): the feed reads afresh and calls `restart`."""

    why: str


class RestartingWatch:
    """One watch of the keys in [start, end) after revision `after`; `label` names it in the
    log line of a start-over ("watch", "departures watch")."""

    def __init__(
        self,
        client: EtcdClient,
        start: bytes,
        end: bytes,
        after: int,
        *,
        run_id: str,
        label: str,
        filters: Sequence[str | int] = (),
        prev_kv: bool = False,
    ) -> None:
        self._client = client
        self._range = (start, end)
        self._filters = filters
        self._prev_kv = prev_kv
        self._run_id = run_id
        self._label = label
        self._pacing = ResyncPacing()
        self._watch = self._open(after)

    def _open(self, after: int) -> Watch:
        return self._client.watch(
            self._range[0], range_end=self._range[1], start_revision=after + 1,
            filters=self._filters, prev_kv=self._prev_kv,
        )

    @property
    def cancelled(self) -> bool:
        return self._watch.cancelled

    def get(self, wait: float | None) -> list[Event] | StartOver | None:
        """Events within `wait` s (None: none came), or a `StartOver`. Refused credentials
        and a closed client are raised: watching again could not help."""
        try:
            return self._watch.get(wait)
        except EtcdCompactedError:
            return StartOver(f"{self._label} history was compacted")
        except EtcdAuthError:
            raise
        except EtcdError as exc:
            if self._client.closed:
                raise
            # An etcd that keeps cancelling gets one full read a second, not one per poll; a
            # blocking poll waits that out instead of spinning.
            if self._pacing.too_soon(wait or 0.0):
                return None
            return StartOver(f"etcd cancelled the {self._label} ({exc})")

    def restart(
        self, revision: int, why: str, catch_up: Callable[[], list[NodeChange]]
    ) -> list[NodeChange]:
        """Watch on from `revision`, that of the feed's fresh read; `catch_up` then brings the
        feed to that read and returns what its consumer is told."""
        # The new watch first: if opening it fails, the old one still reports its error on
        # the next poll (and the feed tries again, its state untouched) instead of the feed
        # going quiet for good.
        fresh = self._open(revision)
        self._watch.cancel()
        self._watch = fresh
        self._pacing.started_over()
        changes = catch_up()
        log.info("rendezvous %s: %s; resynchronised at revision %d", self._run_id, why, revision)
        return changes

    def cancel(self) -> None:
        self._watch.cancel()
