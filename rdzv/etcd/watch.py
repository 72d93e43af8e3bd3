"""Watches multiplexed over ONE etcd Watch stream per client.

Each :class:`Watch` gets a client-chosen ``watch_id`` (honoured by etcd >= 3.4), so responses
route straight to their watch without relying on the order of ``created`` answers. One reader
thread serves the whole stream. When the stream breaks (member died, no leader, failover) the
reader re-opens it (after a jittered pause) on the next endpoint and re-creates every live
watch from its last delivered revision + 1: callers see an uninterrupted, duplicate-free feed.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from rdzv.backoff import Backoff
from rdzv.etcd.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    cause_of,
)
from rdzv.etcd.proto import etcd_min_pb2 as pb
from rdzv.etcd.results import KeyValue
from rdzv.etcd.stream import StreamOwner, requests
from rdzv.etcd.transport import Transport

log = logging.getLogger("rdzv.etcd")

# A broken stream is re-opened after a pause in [0, cap], cap doubling FIRST..MAX s (jittered).
REOPEN_PAUSE_FIRST = 0.05
REOPEN_PAUSE_MAX = 1.0


@dataclass(frozen=True, slots=True)
class Event:
    """One change: ``type`` is ``"PUT"`` or ``"DELETE"``; ``kv.mod_revision`` is its revision."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None


_FILTERS = {"noput": pb.WatchCreateRequest.NOPUT, "nodelete": pb.WatchCreateRequest.NODELETE}


def _filter_value(watch_filter: str | int) -> int:
    if isinstance(watch_filter, int):
        return watch_filter
    try:
        return _FILTERS[watch_filter.lower()]
    except KeyError:
        raise ValueError(f"unknown watch filter {watch_filter!r}; use 'noput' or 'nodelete'") from None


class Watch:
    """Events for one key range. Created by :meth:`EtcdClient.watch`.

    ``get(timeout)`` returns the next batch of events (all from one or more revisions, in
    order), or ``None`` on timeout or once cancelled. Iterating yields batches until cancelled.
    """

    def __init__(
        self,
        hub: WatchHub,
        watch_id: int,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        filters: Sequence[int],
        prev_kv: bool,
    ) -> None:
        self._hub = hub
        self.watch_id = watch_id
        self.key = key
        self.range_end = range_end
        self.start_revision = start_revision
        self._filters = list(filters)
        self._prev_kv = prev_kv
        # Next revision we still need: the re-create point after a stream failure.
        self._next_rev = start_revision
        self._batches: collections.deque[list[Event]] = collections.deque()
        self._cond = threading.Condition()
        self._error: EtcdError | None = None
        self._cancelled = False
        self._created = threading.Event()

    # -- hub side (reader thread) --------------------------------------------------------
    def _create_request(self) -> pb.WatchRequest:
        return pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=self.key, range_end=self.range_end, start_revision=self._next_rev,
            progress_notify=True, filters=self._filters, prev_kv=self._prev_kv, watch_id=self.watch_id,
        ))

    def _on_created(self, header_revision: int) -> None:
        # A "from now" watch starts after the header revision: pin that so a re-create
        # after failover neither misses nor repeats events.
        with self._cond:
            if self._next_rev == 0:
                self._next_rev = header_revision + 1
        self._created.set()

    def _deliver(self, events: Sequence[pb.Event]) -> None:
        out: list[Event] = []
        next_rev = self._next_rev
        for e in events:
            rev = e.kv.mod_revision
            if rev < next_rev:
                continue  # replayed by a re-create that raced with delivery
            out.append(
                Event(
                    "DELETE" if e.type == pb.Event.DELETE else "PUT",
                    KeyValue.from_pb(e.kv),
                    KeyValue.from_pb(e.prev_kv) if e.HasField("prev_kv") else None,
                )
            )
        if not out:
            return
        with self._cond:
            if self._cancelled:
                return
            # Events of one revision always arrive in one response, so rev+1 is safe.
            self._next_rev = out[-1].kv.mod_revision + 1
            self._batches.append(out)
            self._cond.notify_all()

    def _on_progress(self, header_revision: int) -> None:
        # Progress notifications only reach synced watchers: nothing below it is pending.
        with self._cond:
            if self._next_rev and header_revision + 1 > self._next_rev:
                self._next_rev = header_revision + 1

    def _fail(self, err: EtcdError) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()
        self._created.set()

    # -- public --------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The last revision delivered (or the one before the first expected event)."""
        return max(self._next_rev - 1, 0)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def get(self, timeout: float | None = None) -> list[Event] | None:
        """Next batch of events; ``None`` after ``timeout`` seconds or once cancelled.

        Raises :class:`EtcdCompactedError` when the history this watch needs was compacted
        (re-read and watch again), or another :class:`EtcdError` if etcd cancelled the watch.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._cancelled:
                    return None
                if self._batches:
                    return self._batches.popleft()
                if self._error is not None:
                    raise self._error
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)

    def cancel(self) -> None:
        """Stop the watch; pending and future events are dropped. Idempotent."""
        with self._cond:
            if self._cancelled:
                return
            self._cancelled = True
            self._batches.clear()
            self._cond.notify_all()
        self._hub._cancel(self)

    def __iter__(self) -> Iterator[list[Event]]:
        while True:
            batch = self.get()
            if batch is None:
                return
            yield batch

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        return (
            f"Watch(id={self.watch_id}, key={self.key!r}, range_end={self.range_end!r}, "
            f"next_rev={self._next_rev}, cancelled={self._cancelled})"
        )


class _StaleToken(Exception):
    """etcd refused a create on the stream because its auth token expired."""


class WatchHub(StreamOwner):
    """Owns the client's single Watch stream and its reader thread (started on demand)."""

    THREAD_NAME = "rdzv-etcd-watch"

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._watches: dict[int, Watch] = {}
        self._next_id = 1
        self._queue: queue.SimpleQueue[object] | None = None  # requests of the live stream
        self._call: grpc.Future | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._last_error = ""  # why the stream last failed, for "not established" errors

    # -- public-ish (via EtcdClient.watch) -------------------------------------------------

    def watch(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        filters: Sequence[str | int],
        prev_kv: bool,
        timeout: float,
    ) -> Watch:
        with self._lock:
            if self._closed:
                raise EtcdError("etcd client is closed")
            watch = Watch(
                self,
                self._next_id,
                key,
                range_end,
                start_revision,
                [_filter_value(watch_filter) for watch_filter in filters],
                prev_kv,
            )
            self._next_id += 1
            self._watches[watch.watch_id] = watch
            # Registration and enqueueing share the lock with stream (re)opening, so each
            # live watch is created exactly once per stream.
            if self._queue is not None:
                self._queue.put(watch._create_request())
            self._ensure_thread()
            self._wake.notify_all()
        # Wait for etcd's "created" so events written after watch() returns are never missed.
        if not watch._created.wait(timeout):
            watch.cancel()
            why = f"; last error: {self._last_error}" if self._last_error else ""
            raise EtcdConnectionError(
                f"etcd watch on {key!r} not established within {timeout:g}s "
                f"(endpoints: {', '.join(self._transport.endpoints)}){why}"
            )
        # Refusals (permission denied, bad auth) fail fast here; compaction is reported by
        # get() so callers handle it in one place.
        err = watch._error
        if err is not None and not isinstance(err, EtcdCompactedError):
            watch.cancel()
            raise err
        return watch

    def _cancel(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.pop(watch.watch_id, None) is not None and self._queue is not None:
                self._queue.put(
                    pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch.watch_id))
                )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watches = list(self._watches.values())
            self._watches.clear()
            self._teardown_locked()
            self._wake.notify_all()
            thread = self._thread
        for watch in watches:
            watch._fail(EtcdError("etcd client closed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    @property
    def active(self) -> int:
        """Number of live watches on the stream."""
        return len(self._watches)

    # -- stream management -----------------------------------------------------------------

    def _run(self) -> None:
        reopen_pauses = Backoff(REOPEN_PAUSE_FIRST, REOPEN_PAUSE_MAX)
        while True:
            with self._lock:
                # Idle with no watches: the stream is closed and reopened on the next watch().
                while not self._closed and not self._watches:
                    self._teardown_locked()
                    self._wake.wait()
                if self._closed:
                    return
            idx = -1
            try:
                idx, channel = self._transport.stream_channel()
                metadata = self._transport.metadata()
                outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
                with self._lock:
                    if self._closed:
                        return
                    for watch in self._watches.values():
                        outbox.put(watch._create_request())
                    call = channel.watch.Watch(requests(outbox), metadata=metadata)
                    self._queue, self._call = outbox, call
                for resp in call:
                    reopen_pauses.reset()  # the stream works: a later break is a new spell
                    self._last_error = ""
                    self._dispatch(resp)
                raise EtcdConnectionError("watch stream closed by server")
            except grpc.RpcError as e:
                if self._closed:
                    return
                self._last_error = cause_of(e.details() or str(e.code()))
                self._transport.stream_failed(idx, e)
            except _StaleToken:
                self._transport.invalidate_token()
            except EtcdAuthError as e:
                # Bad credentials will not fix themselves: fail every watch.
                self._fail_all(e)
            except EtcdError as e:
                if self._closed:
                    return
                self._last_error = str(e)
                log.debug("etcd watch stream: %s", e)
                self._transport.stream_failed(idx, None)
            except Exception as e:  # pragma: no cover - keep the reader alive no matter what
                log.warning("etcd watch stream crashed: %r", e)
            with self._lock:
                self._teardown_locked()
                if self._closed:
                    return
                self._wake.wait(reopen_pauses.pause())

    def _fail_all(self, err: EtcdError) -> None:
        with self._lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch._fail(err)

    def _dispatch(self, resp: pb.WatchResponse) -> None:
        watch = self._watches.get(resp.watch_id)
        if watch is None:
            return  # cancelled meanwhile, or a progress response for the whole stream
        if resp.canceled and "invalid auth token" in resp.cancel_reason:
            # The stream's token expired: re-authenticate and re-create everything.
            raise _StaleToken(resp.cancel_reason)
        if resp.created:
            if resp.canceled:
                self._drop(watch, self._cancel_error(watch, resp))
                return
            watch._on_created(resp.header.revision)
        if resp.events:
            watch._deliver(resp.events)
        elif not resp.created and not resp.canceled:
            watch._on_progress(resp.header.revision)
        if resp.canceled and not resp.created:
            self._drop(watch, self._cancel_error(watch, resp))

    def _drop(self, watch: Watch, err: EtcdError) -> None:
        with self._lock:
            self._watches.pop(watch.watch_id, None)
        watch._fail(err)

    @staticmethod
    def _cancel_error(watch: Watch, resp: pb.WatchResponse) -> EtcdError:
        if resp.compact_revision:
            return EtcdCompactedError(
                resp.compact_revision,
                f"etcd watch on {watch.key!r} from revision {watch._next_rev} needs compacted history "
                f"(oldest available: {resp.compact_revision}); re-read and watch again",
            )
        reason = resp.cancel_reason or "cancelled by server"
        if "permission denied" in reason or "auth" in reason:
            return EtcdAuthError(f"etcd watch on {watch.key!r} rejected: {reason}")
        return EtcdError(f"etcd watch on {watch.key!r} cancelled: {reason}")
