"""A fault-injecting gRPC proxy in front of a real etcd, for deterministic failure tests.

Every RPC is forwarded byte-for-byte to one upstream etcd (``host:port``, plain HTTP/2) with the
caller's metadata (``hasleader``, ``token``) and deadline; upstream errors come back unchanged.
Rules, changed while it runs, answer chosen calls with one of etcd's own error statuses
(:meth:`FaultProxy.inject`) or hold them until their deadline (:meth:`FaultProxy.stall`);
:meth:`FaultProxy.stall_all` holds every call and every stream message, like an etcd that
accepts connections but does not answer. ``proxy.endpoint`` is what a client dials. The
statuses and the rules are in tests/etcd_fault_rules.py.

    with FaultProxy(etcd.endpoint) as proxy:  # TOO_MANY_REQUESTS from etcd_fault_rules
        proxy.inject({"Txn", "Put"}, error=TOO_MANY_REQUESTS, first_n=2)
        ...
        assert proxy.stats()["Txn"].failed == 2
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from etcd_fault_rules import (
    BIDI_METHODS,
    SERVER_STREAM_METHODS,
    CallStats,
    EtcdStatus,
    Rule,
    SeenCall,
    method_set,
    short_name,
)

_NO_DEADLINE = 1e8  # seconds; gRPC reports "no deadline" as a time far in the future
_HOP_HEADERS = frozenset({"user-agent", "content-type", "te"})
_CLOSE = object()
_MESSAGE_LIMIT = 256 * 1024 * 1024
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
    # Accept the clients' HTTP/2 keepalive pings on idle streams (every 10 s) without
    # answering them with GOAWAY "too many pings", as etcd accepts them.
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
    ("grpc.enable_http_proxy", 0),
]
_numbers = itertools.count(1)


class FaultProxy:
    """An in-process gRPC server on ``127.0.0.1:<free port>`` forwarding to ``upstream``.

    Thread-safe; ``start()``/``stop()`` or ``with``. ``stop()`` cancels every call, ends every
    forwarding thread and closes the upstream channel. ``max_workers`` bounds concurrent calls
    (each open stream holds one worker and one pump thread).
    """

    def __init__(self, upstream: str, *, max_workers: int = 64) -> None:
        self.upstream = upstream
        self.name = f"etcd-fault-proxy-{next(_numbers)}"  # its threads' names start so
        self._max_workers = max_workers
        self._cond = threading.Condition()
        self._rules: list[Rule] = []
        self._stats: dict[str, CallStats] = {}
        self._seen: dict[str, SeenCall] = {}
        self._held_all = False
        self._epoch = 0  # bumped by clear(): releases calls held by stall rules
        self._stopped = False
        self._pumps: set[threading.Thread] = set()
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._channel: grpc.Channel | None = None
        self.port = 0

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        if self._server is not None or self._stopped:
            raise RuntimeError("a FaultProxy starts once")
        self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix=self.name)
        self._channel = grpc.insecure_channel(self.upstream, options=_CHANNEL_OPTIONS)
        self._server = grpc.server(
            self._executor, handlers=[_Handlers(self)], options=_SERVER_OPTIONS
        )
        try:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
            if not self.port:
                raise RuntimeError("the fault proxy could not bind a port on 127.0.0.1")
            self._server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every call, end every thread, close the upstream channel. Idempotent."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        if self._server is not None:
            done = self._server.stop(grace=None)
            if self._channel is not None:
                self._channel.close()  # ends the upstream calls that handlers wait on
            done.wait(10)
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # no handler runs, so no pump starts, after this
        with self._cond:
            pumps = set(self._pumps)
        for pump in pumps:
            pump.join(10)

    def live_threads(self) -> list[threading.Thread]:
        """The proxy's own threads still running (workers and stream pumps)."""
        ours = (f"{self.name}_", f"{self.name}-")
        return [t for t in threading.enumerate() if t.name.startswith(ours)]

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rules -------------------------------------------------------------------------------

    def inject(
        self,
        methods: Iterable[str] | str | None = None,
        *,
        error: EtcdStatus | None = None,
        code: grpc.StatusCode | None = None,
        details: str = "",
        fraction: float = 1.0,
        first_n: int | None = None,
        seed: int = 0,
    ) -> Rule:
        """Answer matching calls (a stream: its opening) with ``error``, or ``code`` and
        ``details``, instead of forwarding them. Rules are asked in the order added."""
        if error is None:
            if code is None:
                raise ValueError("give error= or code= (with details=)")
            error = EtcdStatus(code, details)
        elif code is not None:
            raise ValueError("give error= or code=, not both")
        return self._add(Rule(method_set(methods), error, fraction, first_n, seed))

    def stall(
        self,
        methods: Iterable[str] | str | None = None,
        *,
        fraction: float = 1.0,
        first_n: int | None = None,
        seed: int = 0,
    ) -> Rule:
        """Hold matching calls (a stream: its opening) until their deadline, their
        cancellation or :meth:`clear`, whichever comes first; then a live one is forwarded."""
        return self._add(Rule(method_set(methods), None, fraction, first_n, seed))

    def _add(self, rule: Rule) -> Rule:
        with self._cond:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule; calls held by a stall rule go on (unless :meth:`stall_all` holds)."""
        with self._cond:
            self._rules.clear()
            self._epoch += 1
            self._cond.notify_all()

    def stall_all(self) -> None:
        """Hold every call, every call's answer and every stream message until :meth:`resume`."""
        with self._cond:
            self._held_all = True

    def resume(self) -> None:
        with self._cond:
            self._held_all = False
            self._cond.notify_all()

    def reset(self) -> None:
        """No rules, nothing held, counters at zero."""
        self.clear()
        self.resume()
        with self._cond:
            self._stats.clear()
            self._seen.clear()

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> dict[str, CallStats]:
        """A snapshot per method short name (``"Txn"``); methods never called are absent."""
        with self._cond:
            return {name: CallStats(**vars(s)) for name, s in self._stats.items()}

    def last_seen(self, method: str) -> SeenCall | None:
        """What the latest call to ``method`` arrived with (None: no call yet)."""
        with self._cond:
            return self._seen.get(short_name(method))

    def _count_response(self, name: str) -> None:
        with self._cond:
            self._stats[name].responses += 1

    # -- forwarding --------------------------------------------------------------------------

    def _admit(self, name: str, context: grpc.ServicerContext) -> None:
        """Count the call, then fail it, hold it, or let it through (returns)."""
        context.add_callback(self._wake)
        metadata = _forwarded(context)
        with self._cond:
            stats = self._stats.setdefault(name, CallStats())
            stats.seen += 1
            self._seen[name] = SeenCall(metadata, _timeout(context))
            rule = next((r for r in self._rules if r.hits(name)), None)
            if rule is not None and rule.status is not None:
                stats.failed += 1
            elif rule is not None or self._held_all:
                stats.stalled += 1
            epoch = self._epoch
        if rule is not None and rule.status is not None:
            context.abort(rule.status.code, rule.status.details)
        if rule is None:
            self._hold_or_abort(context, lambda: self._held_all)
        else:
            self._hold_or_abort(context, lambda: self._held_all or self._epoch == epoch)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _hold(self, context: grpc.ServicerContext, held: Callable[[], bool]) -> bool:
        """Wait while ``held()``; True when the call may go on (still live, proxy running)."""
        with self._cond:
            while held() and not self._stopped and context.is_active():
                left = _timeout(context)
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return not self._stopped and context.is_active()

    def _hold_or_abort(self, context: grpc.ServicerContext, held: Callable[[], bool]) -> None:
        if not self._hold(context, held):
            if self._stopped:
                context.abort(grpc.StatusCode.UNAVAILABLE, "etcd fault proxy stopped")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while held")

    def _forward_unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        name = short_name(method)
        self._admit(name, context)
        assert self._channel is not None
        try:
            response = self._channel.unary_unary(method)(
                request, timeout=_timeout(context), metadata=_forwarded(context)
            )
        except grpc.RpcError as e:
            context.abort(e.code(), e.details() or "")
        except ValueError:  # the channel was closed by stop()
            context.abort(grpc.StatusCode.UNAVAILABLE, "etcd fault proxy stopped")
        self._hold_or_abort(context, lambda: self._held_all)
        self._count_response(name)
        return response

    def _forward_stream(
        self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        name = short_name(method)
        self._admit(name, context)
        assert self._channel is not None
        outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        try:
            call = self._channel.stream_stream(method)(
                _drain(outbox), timeout=_timeout(context), metadata=_forwarded(context)
            )
        except ValueError:  # the channel was closed by stop()
            context.abort(grpc.StatusCode.UNAVAILABLE, "etcd fault proxy stopped")
        if not context.add_callback(call.cancel):
            call.cancel()
        pump = threading.Thread(
            target=self._pump, args=(requests, outbox, context), name=f"{self.name}-pump"
        )
        with self._cond:
            self._pumps.add(pump)
        pump.start()
        try:
            yield from self._responses(name, call, context)
        finally:
            call.cancel()
            outbox.put(_CLOSE)

    def _forward_server_stream(
        self, method: str, request: bytes, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        name = short_name(method)
        self._admit(name, context)
        assert self._channel is not None
        try:
            call = self._channel.unary_stream(method)(
                request, timeout=_timeout(context), metadata=_forwarded(context)
            )
        except ValueError:  # the channel was closed by stop()
            context.abort(grpc.StatusCode.UNAVAILABLE, "etcd fault proxy stopped")
        if not context.add_callback(call.cancel):
            call.cancel()
        try:
            yield from self._responses(name, call, context)
        finally:
            call.cancel()

    def _responses(self, name: str, call: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Upstream's answers to the caller, one at a time through the stall gate."""
        try:
            for response in call:
                if not self._hold(context, lambda: self._held_all):
                    return
                self._count_response(name)
                yield response
        except grpc.RpcError as e:
            if context.is_active() and not self._stopped:
                context.abort(e.code(), e.details() or "")

    def _pump(
        self,
        requests: Iterator[bytes],
        outbox: queue.SimpleQueue[object],
        context: grpc.ServicerContext,
    ) -> None:
        """The caller's stream messages to upstream; a caller's half-close is passed on."""
        try:
            for request in requests:
                if not self._hold(context, lambda: self._held_all):
                    return
                outbox.put(request)
        except grpc.RpcError:
            pass  # the caller's side ended (cancelled, or the proxy stopped)
        finally:
            outbox.put(_CLOSE)
            with self._cond:
                self._pumps.discard(threading.current_thread())


def _forwarded(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's own metadata (``hasleader``, ``token``, ...), without transport headers."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in _HOP_HEADERS
    )


def _timeout(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline (None: it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE else max(remaining, 0.0)


def _drain(outbox: queue.SimpleQueue[object]) -> Iterator[Any]:
    while (item := outbox.get()) is not _CLOSE:
        yield item


class _Handlers(grpc.GenericRpcHandler):
    """Every method, with bytes in and out, to the proxy's forwarding for its kind."""

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        name = short_name(method)
        proxy = self._proxy
        if name in BIDI_METHODS:
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: proxy._forward_stream(method, requests, context)
            )
        if name in SERVER_STREAM_METHODS:
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: proxy._forward_server_stream(method, request, context)
            )
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: proxy._forward_unary(method, request, context)
        )
