"""Lease keep-alives for many leases over ONE LeaseKeepAlive stream per client.

A scheduler thread sends each registered lease's keep-alive when due; a reader thread per
stream applies the answers. A lease is reported lost when etcd says so: a keep-alive answered
with TTL <= 0 (expired or revoked). Each lease also tracks a conservative local expiry (send
time of the request that was answered + TTL); when it passes without an answer (etcd stalled,
without quorum, or out of reach), the lease is only noted as unconfirmed and refreshed on: an
etcd that is down for everyone cannot have handed our place to anyone, and it keeps leases
across a restart or a quorum loss (a new leader renews them). The first answer decides.
A broken or stalled stream is re-opened on the client's next endpoint (with one endpoint, a
stalled stream is kept until the lease's TTL: re-opening it sooner would only send the same
keep-alives to the same silent member). Retries never add load to a struggling etcd: at most one keep-alive per lease is
outstanding, re-opens back off with jitter, and a new stream spreads its first keep-alives.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from rdzv.backoff import Backoff
from rdzv.etcd.errors import EtcdAuthError, EtcdError
from rdzv.etcd.proto import etcd_min_pb2 as pb
from rdzv.etcd.stream import StreamOwner, requests
from rdzv.etcd.transport import Transport

log = logging.getLogger("rdzv.etcd")

OnLost = Callable[[int], None]

# A new stream's first keep-alives are spread over up to this many seconds (and a quarter of
# each lease's interval); re-opening a broken stream backs off up to REOPEN_BACKOFF_MAX s.
REOPEN_SPREAD = 1.0
REOPEN_BACKOFF_FIRST = 0.05
REOPEN_BACKOFF_MAX = 2.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease: ``id`` and the TTL (seconds) etcd granted."""

    id: int
    ttl: int


@dataclass
class _KeptLease:
    """One lease the keeper refreshes, with its owners and what etcd last answered."""

    lease_id: int
    ttl: float
    expires: float  # monotonic: by then the lease has surely expired unless refreshed
    next_due: float
    # registration id -> (interval, on_lost); several owners may keep one lease.
    owners: dict[int, tuple[float, OnLost | None]] = field(default_factory=dict)
    pending_since: float | None = None  # send time of the oldest unanswered keep-alive on this stream
    # Send time of the first keep-alive since etcd last answered, across stream re-opens.
    unanswered_since: float | None = None
    unconfirmed_since: float | None = None  # when `expires` passed with etcd silent

    @property
    def interval(self) -> float:
        return min(interval for interval, _ in self.owners.values())


class LeaseKeeper(StreamOwner):
    """Refreshes registered leases over the client's transport (``client.keep_alive``)."""

    THREAD_NAME = "rdzv-etcd-keepalive"

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._cond = threading.Condition()
        self._leases: dict[int, _KeptLease] = {}
        self._reg_ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        # Live stream state (guarded by _cond).
        self._queue: queue.SimpleQueue[object] | None = None
        self._call: Any = None
        self._stream_gen = 0
        self._broken: tuple[int, BaseException | None] | None = None
        self._endpoint_idx = -1
        self._opened_at = 0.0
        self._answered = False  # the live stream has had an answer (it worked, at least once)

    # -- registration --------------------------------------------------------------------

    def register(
        self,
        lease_id: int,
        ttl: float | None = None,
        *,
        interval: float | None = None,
        on_lost: OnLost | None = None,
    ) -> int:
        """Start refreshing ``lease_id``; returns a registration id for :meth:`unregister`.

        ``interval`` defaults to ttl/3. ``on_lost(lease_id)`` is called once, from a keeper
        thread, when etcd answers that the lease is gone (expired or revoked); it must be quick.
        Without ``ttl`` a keep-alive is sent at once and its answer supplies the TTL.
        """
        now = time.monotonic()
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be > 0")
        if interval is None:
            interval = max((ttl or 3.0) / 3.0, 0.1)
        if interval <= 0:
            raise ValueError("interval must be > 0")
        with self._cond:
            if self._closed:
                raise EtcdError("etcd client is closed")
            reg = next(self._reg_ids)
            kept = self._leases.get(lease_id)
            if kept is None:
                # Unknown TTL: assume ~3 intervals until etcd tells us the real one.
                assumed = ttl if ttl is not None else 3 * interval
                kept = _KeptLease(lease_id, assumed, now + assumed, now if ttl is None else now + interval)
                self._leases[lease_id] = kept
            kept.owners[reg] = (interval, on_lost)
            kept.next_due = min(kept.next_due, now + interval)
            self._ensure_thread()
            self._cond.notify_all()
        return reg

    def unregister(self, lease_id: int, registration: int | None = None) -> None:
        """Drop one registration (the given one, else the latest); refreshing stops with the last."""
        with self._cond:
            kept = self._leases.get(lease_id)
            if kept is None:
                return
            if registration is None:
                if kept.owners:
                    kept.owners.pop(next(reversed(kept.owners)))
            else:
                kept.owners.pop(registration, None)
            if not kept.owners:
                del self._leases[lease_id]
            self._cond.notify_all()

    def is_kept(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def keep_alive_lag(self, lease_id: int) -> float | None:
        """Seconds the oldest unanswered keep-alive of ``lease_id`` has waited (0.0 when etcd
        has answered them all; None when the lease is not kept). It grows while etcd is slow,
        stalled or out of reach; past the TTL the lease is only unconfirmed (module docstring)."""
        with self._cond:
            kept = self._leases.get(lease_id)
            if kept is None:
                return None
            now = time.monotonic()
            since = kept.unanswered_since
            if since is None and now > kept.next_due:
                since = kept.next_due  # due and not sent: no stream is open
            return 0.0 if since is None else max(now - since, 0.0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._leases.clear()
            self._teardown_locked()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # -- internals -------------------------------------------------------------------------

    def _teardown_locked(self) -> None:
        super()._teardown_locked()
        self._stream_gen += 1

    def _open_stream(self) -> None:
        idx, channel = self._transport.stream_channel()
        metadata = self._transport.metadata()
        outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        with self._cond:
            if self._closed:
                return
            call = channel.lease.LeaseKeepAlive(requests(outbox), metadata=metadata)
            self._queue, self._call, self._endpoint_idx = outbox, call, idx
            self._opened_at = time.monotonic()
            self._answered = False
            self._broken = None
            gen = self._stream_gen
            # A new stream may follow a gap: refresh everything soon, but spread over a moment,
            # so that many clients re-opening at once (etcd back from a stall) do not all send
            # at the same instant.
            now = time.monotonic()
            for kept in self._leases.values():
                kept.next_due = now + random.uniform(0, min(kept.interval / 4, REOPEN_SPREAD))
                kept.pending_since = None
        threading.Thread(
            target=self._read, args=(call, gen, idx), name="rdzv-etcd-keepalive-rx", daemon=True
        ).start()

    def _read(self, call: Any, gen: int, idx: int) -> None:
        err: BaseException | None = None
        try:
            for resp in call:
                self._on_response(resp, gen)
        except grpc.RpcError as e:
            err = e
        except Exception as e:  # pragma: no cover - defensive
            err = e
        with self._cond:
            if gen == self._stream_gen and not self._closed:
                self._broken = (idx, err)
                self._cond.notify_all()

    def _on_response(self, resp: pb.LeaseKeepAliveResponse, gen: int) -> None:
        now = time.monotonic()
        lost: list[tuple[int, list[OnLost]]] = []
        with self._cond:
            if gen != self._stream_gen:
                return  # late answer from a stream we already replaced
            self._answered = True
            kept = self._leases.get(resp.ID)
            if kept is None:
                return
            if resp.TTL <= 0:
                lost.append(self._pop_lost_locked(kept))
            else:
                sent = kept.pending_since if kept.pending_since is not None else now
                kept.ttl = float(resp.TTL)
                kept.expires = sent + resp.TTL
                kept.pending_since = None
                kept.unanswered_since = None
                if kept.unconfirmed_since is not None:
                    log.warning(
                        "etcd lease %x is still alive: etcd answered again after %.0f s past its "
                        "local expiry", kept.lease_id, now - kept.unconfirmed_since,
                    )
                    kept.unconfirmed_since = None
        self._fire(lost)

    def _pop_lost_locked(self, kept: _KeptLease) -> tuple[int, list[OnLost]]:
        self._leases.pop(kept.lease_id, None)
        return kept.lease_id, [callback for _, callback in kept.owners.values() if callback is not None]

    @staticmethod
    def _fire(lost: list[tuple[int, list[OnLost]]]) -> None:
        for lease_id, callbacks in lost:
            log.warning("etcd lease %x lost", lease_id)
            for callback in callbacks:
                try:
                    callback(lease_id)
                except Exception:
                    log.exception("on_lost callback for lease %x failed", lease_id)

    def _run(self) -> None:
        # Between half and all of the cap: a re-open is a new stream for a struggling etcd, so
        # never at once, yet jittered so clients that lost it together do not return together.
        reopen_pauses = Backoff(REOPEN_BACKOFF_FIRST, REOPEN_BACKOFF_MAX, floor=0.5)
        while True:
            with self._cond:
                while not self._closed and not self._leases:
                    self._teardown_locked()
                    self._cond.wait()
                if self._closed:
                    return
                broken = self._broken
                need_open = self._queue is None or broken is not None
                if broken is not None:
                    self._teardown_locked()
                    self._broken = None
            if broken is not None:
                idx, err = broken
                self._transport.stream_failed(idx, err)
                if self._answered and time.monotonic() - self._opened_at > 5.0:
                    reopen_pauses.reset()  # the stream had worked for a while: retry promptly
                self._sleep(reopen_pauses.pause())
            if need_open:
                try:
                    self._open_stream()
                except EtcdAuthError as e:
                    log.error("etcd keep-alive cannot authenticate: %s", e)
                    self._note_unconfirmed()
                    self._sleep(1.0)
                    continue
                except EtcdError as e:
                    log.debug("etcd keep-alive stream: %s", e)
                    self._transport.stream_failed(-1, None)
                    self._note_unconfirmed()
                    self._sleep(reopen_pauses.pause())
                    continue
            self._tick()

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if not self._closed:
                self._cond.wait(seconds)

    def _note_unconfirmed(self) -> None:
        """Say once per lease that its local expiry passed with etcd silent (not a loss: only
        etcd's answer is; see the module docstring)."""
        now = time.monotonic()
        with self._cond:
            for kept in self._leases.values():
                if now >= kept.expires and kept.unconfirmed_since is None:
                    kept.unconfirmed_since = now
                    log.warning(
                        "etcd lease %x: no answer from etcd for %.0f s, past its TTL; kept as "
                        "live until etcd answers", kept.lease_id, now - kept.expires + kept.ttl,
                    )

    def _tick(self) -> None:
        """Send due keep-alives, detect a stalled stream, then wait."""
        self._note_unconfirmed()
        now = time.monotonic()
        with self._cond:
            outbox = self._queue
            stalled = False
            wake = now + 1.0
            for kept in list(self._leases.values()):
                # Refresh a little early when another lease is due anyway: with hundreds of
                # leases this batches their keep-alives into a few wake-ups per second.
                slack = min(0.2, kept.interval * 0.1)
                if now >= kept.next_due - slack and outbox is not None:
                    # One keep-alive outstanding per lease: a silent etcd gets no queue of
                    # them to answer all at once when it comes back.
                    if kept.pending_since is None:
                        outbox.put(pb.LeaseKeepAliveRequest(ID=kept.lease_id))
                        kept.pending_since = now
                    if kept.unanswered_since is None:
                        kept.unanswered_since = now
                    kept.next_due = now + kept.interval
                if kept.pending_since is not None:
                    # No answer for a while: the member is stuck or partitioned. With another
                    # member to try, move on soon; with one, only past the TTL (by then the
                    # connection itself is suspect, and gRPC's keepalive has had its chance).
                    stall = max(0.5, min(self._transport.timeout, kept.ttl / 3.0))
                    if len(self._transport.endpoints) == 1:
                        stall = max(stall, kept.ttl)
                    if now - kept.pending_since > stall:
                        stalled = True
                    wake = min(wake, kept.pending_since + stall + 0.01)
                wake = min(wake, kept.next_due)
                if kept.unconfirmed_since is None:
                    wake = min(wake, kept.expires)
            if stalled and self._broken is None and self._queue is not None:
                log.info("etcd keep-alive stream stalled; switching endpoint")
                self._broken = (self._endpoint_idx, None)
            elif not self._closed and self._broken is None:
                self._cond.wait(max(wake - time.monotonic(), 0.0))
