"""The connection to one etcd cluster: channels, the current endpoint, auth and retries.

* Calls go to the *current* endpoint and move to the next one on UNAVAILABLE. We do the
  failover ourselves (not gRPC's ``ipv4:`` multi-address targets) so DNS names and TLS work.
* Reads are retried on another endpoint (also after a per-try deadline). Writes are only
  retried when the request provably never reached etcd (connect failure, "no leader"
  rejection) unless the caller marks them safe to repeat.
* An etcd that is reached but busy (silent, "too many requests", electing a leader, out of
  space) is asked again after a pause with full jitter, within the call's deadline, so that
  thousands of clients turned away at once do not come back at once; at the deadline the call
  raises ``EtcdBusyError``, which callers may wait out. A refused connection or an unknown host
  is an ``EtcdConnectionError``: a wrong endpoint, not worth waiting for.
* Every call carries ``hasleader: true`` so a member cut off from the leader rejects it at
  once instead of hanging until the deadline. gRPC errors become EtcdError here, once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc

from rdzv.backoff import Backoff
from rdzv.etcd.endpoints import Channel, channel_options, parse_endpoints, tls_credentials
from rdzv.etcd.errors import (
    EtcdBusyError,
    EtcdConnectionError,
    EtcdError,
    EtcdTLSError,
    EtcdTLSMismatchError,
    busy_cause,
    cause_of,
    error_from_rpc,
    is_connect_failure,
    is_tls_failure,
    never_sent,
    token_expired,
)
from rdzv.etcd.failures import describe, gave_up
from rdzv.etcd.probe import PROBE_TIMEOUT, mismatch_hint
from rdzv.etcd.proto import etcd_min_pb2 as pb

Metadata = tuple[tuple[str, str], ...]

_BASE_MD: Metadata = (("hasleader", "true"),)
# How long a protocol probe's verdict on an endpoint holds (no probe per retry).
PROBE_HOLDS = 30.0
# Pauses between tries of a busy etcd: drawn from [0, cap], the cap doubling up to BUSY_PAUSE_MAX.
BUSY_PAUSE_FIRST = 0.05
BUSY_PAUSE_MAX = 1.0
# Pauses after every member failed once to connect: drawn from [0, cap], the cap doubling from
# ROUND_PAUSE_FIRST to ROUND_PAUSE_MAX (a small pause per round: connect_timeout bounds them all).
ROUND_PAUSE_FIRST = 0.05
ROUND_PAUSE_MAX = 0.5
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class Transport:
    """Unary calls with failover, and what the client's streams need to (re)open.

    ``timeout`` is the default per-call deadline (seconds); ``connect_timeout`` bounds how long
    an unreachable endpoint is tried. TLS is used for ``https://`` endpoints, and for bare ones
    when ``tls=True`` or a ``ca_cert``/``cert`` is given.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout: float,
        connect_timeout: float,
        ca_cert: str | None,
        cert: str | None,
        key: str | None,
        tls: bool | None,
        user: str | None,
        password: str | None,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeout and connect_timeout must be > 0")
        if (cert is None) != (key is None):
            raise ValueError("give both cert and key (client certificate and its private key)")
        if password is not None and not user:
            raise ValueError("password given without user")
        if tls is None and (ca_cert or cert):
            tls = True
        self._endpoints = parse_endpoints(endpoints, tls)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.user = user or None
        self._password = password or ""
        self.tls = any(e.secure for e in self._endpoints)
        self._creds = tls_credentials(ca_cert, cert, key) if self.tls else None
        self._options = channel_options(self.connect_timeout)
        self._lock = threading.Lock()
        self._channels: list[Channel | None] = [None] * len(self._endpoints)
        self._cur = 0
        self._metadata: Metadata = _BASE_MD
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self._closed = False
        self._forked = False  # inherited across fork(): unusable here, see disown()
        # endpoint index -> (verdict valid until, TLS/plain mismatch hint or None)
        self._probed: dict[int, tuple[float, str | None]] = {}

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def forked(self) -> bool:
        """Inherited by a fork()ed child: every call raises and nothing may be torn down."""
        return self._forked

    def disown(self) -> None:
        """Called in a fork()ed child: the channels are the parent's, so refuse every call."""
        self._forked = self._closed = True

    def closed_error(self) -> EtcdError:
        if self._forked:
            return EtcdError(
                "etcd client belongs to the parent process (created before fork()); "
                "create a new client or handler in this process"
            )
        return EtcdError("etcd client is closed")

    def refuse_calls(self) -> bool:
        """Make every later call fail as closed; True only for the caller that did so."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def close(self) -> None:
        """Refuse calls and close every channel. Idempotent; does nothing once disowned."""
        if self._forked:
            return
        self.refuse_calls()
        with self._lock:
            channels, self._channels = self._channels, [None] * len(self._endpoints)
        for channel in channels:
            if channel is not None:
                channel.close()

    # -- endpoints ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [e.address for e in self._endpoints]

    @property
    def endpoint(self) -> str:
        """The endpoint calls currently go to."""
        return self._endpoints[self._cur].address

    def _channel(self, idx: int) -> Channel:
        if self._forked:
            raise self.closed_error()
        channel = self._channels[idx]
        if channel is None:
            with self._lock:
                if self._closed:
                    raise self.closed_error()
                channel = self._channels[idx]
                if channel is None:
                    channel = Channel(self._endpoints[idx], self._creds, self._options)
                    self._channels[idx] = channel
        return channel

    def _rotate(self, idx: int) -> None:
        # Only the first thread to see endpoint idx fail moves on; others reuse its choice.
        with self._lock:
            if self._cur == idx:
                self._cur = (idx + 1) % len(self._endpoints)

    # -- auth --------------------------------------------------------------------------------

    def metadata(self) -> Metadata:
        """What every request carries: ``hasleader`` and, with a user, a fresh auth token."""
        if self.user is not None and self._token is None:
            self.authenticate()
        return self._metadata

    def authenticate(self) -> None:
        """Get a token now unless one is held (nothing to do without a user)."""
        if self.user is None:
            return
        with self._auth_lock:
            if self._token is not None:
                return
            req = pb.AuthenticateRequest(name=self.user, password=self._password)
            resp = self.call("auth", "Authenticate", req, None, retry=True, auth=False)
            self._token = resp.token
            self._metadata = (*_BASE_MD, ("token", resp.token))

    def invalidate_token(self, metadata: Metadata | None = None) -> None:
        """Drop the token (only if ``metadata`` still carries it) so the next call authenticates."""
        with self._auth_lock:
            if metadata is None or metadata is self._metadata:
                self._token = None
                self._metadata = _BASE_MD

    # -- streams (the lease keeper's and the watch hub's) ------------------------------------

    def stream_channel(self) -> tuple[int, Channel]:
        """The current endpoint's index and channel, for opening a stream on it."""
        idx = self._cur
        return idx, self._channel(idx)

    def stream_failed(self, idx: int, err: BaseException | None) -> None:
        """A stream on endpoint ``idx`` (-1: none opened) broke: re-auth or move on."""
        if isinstance(err, grpc.RpcError):
            code = err.code()
            details = err.details() or ""
            if code == grpc.StatusCode.CANCELLED and self._closed:
                return
            if token_expired(details):
                self.invalidate_token()
                return
        if idx >= 0:
            self._rotate(idx)

    # -- unary calls -------------------------------------------------------------------------

    def call(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None,
        *,
        retry: bool,
        auth: bool = True,
    ) -> Any:
        """Invoke ``service.method`` with failover; ``retry`` marks the call safe to repeat."""
        total = self.timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + total
        endpoint_count = len(self._endpoints)
        failures: dict[str, str] = {}
        mismatched: dict[str, str] = {}  # endpoint -> what to change (TLS on one side only)
        connect_failed: set[int] = set()
        tls_failed: set[int] = set()
        reauthed = False
        attempts = 0
        round_pauses = Backoff(ROUND_PAUSE_FIRST, ROUND_PAUSE_MAX)
        busy_pauses = Backoff(BUSY_PAUSE_FIRST, BUSY_PAUSE_MAX)
        while True:
            if self._closed:
                raise self.closed_error()
            idx = self._cur
            channel = self._channel(idx)
            metadata = self.metadata() if auth else _BASE_MD
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise gave_up(self._endpoints, self.endpoint, failures, self.connect_timeout, f"no answer within {total:g}s")
            per_try = remaining
            if retry and endpoint_count > 1:
                # Leave time to try another member if this one hangs.
                # A member whose leader just died holds the request until the deadline, so
                # never give one member the whole budget.
                per_try = max(remaining / 2, min(remaining, 1.0))
            try:
                stub = getattr(channel, service)
                return getattr(stub, method)(request, timeout=per_try, metadata=metadata)
            except grpc.RpcError as e:
                code = e.code()
                details = e.details() or ""
                address = channel.address
                busy = busy_cause(details)
                if busy is not None:
                    # Reached, but turned away or left unsettled: ask again later (the same
                    # member, or the next one), with jitter so a herd does not return at once.
                    failures[address] = busy
                    if not retry and not never_sent(details):
                        raise EtcdBusyError(
                            f"etcd at {address}: {busy}; the write was not retried and may or "
                            "may not have been applied", code=code.name if code else None,
                        ) from None
                    if endpoint_count > 1:
                        self._rotate(idx)
                    busy_pauses.sleep(deadline)
                    continue
                if code == _UNAVAILABLE:
                    failures[address] = cause_of(details)
                    self._rotate(idx)
                    mismatch = self._protocol_mismatch(idx, details)
                    if mismatch is not None:
                        mismatched[address] = failures[address] = mismatch
                    if is_tls_failure(details) or mismatch is not None:
                        tls_failed.add(idx)
                        if len(tls_failed) == endpoint_count:
                            if len(mismatched) == endpoint_count:
                                raise EtcdTLSMismatchError(
                                    "; ".join(mismatched.values()), code="UNAVAILABLE"
                                ) from None
                            raise EtcdTLSError(
                                describe(self._endpoints, failures), code="UNAVAILABLE"
                            ) from None
                    elif not retry and not never_sent(details):
                        raise EtcdConnectionError(
                            f"etcd at {address} failed mid-request ({failures[address]}); "
                            "the write was not retried and may or may not have been applied"
                        ) from None
                    if is_connect_failure(details):
                        connect_failed.add(idx)
                        if (
                            len(connect_failed | tls_failed) == endpoint_count
                            and time.monotonic() - start >= self.connect_timeout
                        ):
                            raise gave_up(self._endpoints, self.endpoint, failures, self.connect_timeout) from None
                    attempts += 1
                    if attempts % endpoint_count == 0:
                        # Every member failed once: pause before the next round (jittered, so
                        # clients that lost etcd together do not reconnect in step).
                        round_pauses.sleep(deadline)
                    continue
                if code == _DEADLINE:
                    failures[address] = f"no answer within {per_try:.3g}s"
                    if retry and endpoint_count > 1 and deadline - time.monotonic() > 0.01:
                        self._rotate(idx)
                        continue
                    if not retry:
                        raise EtcdBusyError(
                            f"etcd at {address} timed out after {per_try:.3g}s; the request "
                            "was not retried and may or may not have been applied"
                        ) from None
                    raise gave_up(self._endpoints, self.endpoint, failures, self.connect_timeout) from None
                if auth and self.user is not None and not reauthed and token_expired(details):
                    reauthed = True
                    self.invalidate_token(metadata)
                    continue
                if code == grpc.StatusCode.CANCELLED and self._closed:
                    raise EtcdError("etcd client is closed") from None
                raise error_from_rpc(e, address) from None
            except ValueError as e:
                # grpc raises ValueError when the channel was closed under us.
                if self._closed:
                    raise EtcdError("etcd client is closed") from None
                raise EtcdError(f"etcd at {channel.address}: {e}") from None

    def call_at(
        self, endpoint: str, service: str, method: str, request: Any, timeout: float
    ) -> tuple[str, Any]:
        """One try at the named endpoint (one of :attr:`endpoints`), without failover.

        Returns the endpoint's address and the answer."""
        address = parse_endpoints([endpoint], self.tls)[0].address
        idx = next((i for i, e in enumerate(self._endpoints) if e.address == address), None)
        if idx is None:
            raise ValueError(f"{endpoint!r} is not one of {self.endpoints}")
        stub = getattr(self._channel(idx), service)
        try:
            answer = getattr(stub, method)(request, timeout=timeout, metadata=self.metadata())
            return address, answer
        except grpc.RpcError as e:
            if e.code() in (_UNAVAILABLE, _DEADLINE):
                cls = EtcdTLSError if is_tls_failure(e.details() or "") else EtcdConnectionError
                raise cls(
                    f"etcd at {address} unreachable: {cause_of(e.details() or 'timed out')}"
                ) from None
            raise error_from_rpc(e, address) from None

    def _protocol_mismatch(self, idx: int, details: str) -> str | None:
        """What to change when endpoint `idx` speaks TLS and we do not, or the reverse.

        gRPC words a mismatch like a server hanging up ("Socket closed", "Handshake read
        failed"); a probe of the endpoint (rdzv/etcd/probe.py) settles it, so the user hears
        which side is wrong at once instead of after connect_timeout of retries."""
        endpoint = self._endpoints[idx]
        low = details.lower()
        hung_up = "handshake read failed" in low or "wrong version number" in low
        if not (hung_up if endpoint.secure else "socket closed" in low):
            return None
        now = time.monotonic()
        held = self._probed.get(idx)
        if held is not None and now < held[0]:
            return held[1]
        bound = min(self.connect_timeout, PROBE_TIMEOUT)
        hint = mismatch_hint(endpoint.address, endpoint.secure, bound)
        self._probed[idx] = (now + PROBE_HOLDS, hint)
        return hint
