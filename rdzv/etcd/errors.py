"""Exceptions raised by :mod:`rdzv.etcd`. Every one derives from :class:`EtcdError`."""

from __future__ import annotations

import re

import grpc


class EtcdError(Exception):
    """Base class; also raised as-is for etcd errors without a more specific class."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        # The gRPC status code name (e.g. "FAILED_PRECONDITION") when the error came from etcd.
        self.code = code


class EtcdConnectionError(EtcdError):
    """No endpoint answered in time (refused, unreachable, timed out, no leader, TLS failure).

    The message names every endpoint tried and why it failed. For a non-idempotent write the
    outcome is unknown: it may or may not have been applied.
    """


class EtcdBusyError(EtcdConnectionError):
    """etcd was reached but did not serve the request: it accepts connections and stays silent
    (stalled, a long fsync, a GC pause), sheds load ("too many requests"), is electing a leader,
    or is out of space. Unlike a refused connection or an unknown host (a wrong endpoint), this
    passes by itself or by an operator's hand: worth waiting for."""


class EtcdAuthError(EtcdError):
    """Wrong user/password, missing credentials, or permission denied."""


class EtcdTLSError(EtcdAuthError, EtcdConnectionError):
    """The TLS handshake was rejected (untrusted server, missing or unknown client certificate).

    Both an auth error (bad credentials) and a connection error (nothing was reached), so
    either ``except`` clause catches it.
    """


class EtcdTLSMismatchError(EtcdTLSError):
    """One side speaks TLS and the other does not; the message says which setting to change."""


class EtcdCompactedError(EtcdError):
    """The requested revision was compacted away; re-read the current state and watch again."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        super().__init__(
            message or f"etcd revision compacted (compact revision {compact_revision})",
            code="OUT_OF_RANGE",
        )
        # Oldest revision still available; 0 when etcd did not say (e.g. on a range read).
        self.compact_revision = compact_revision


class EtcdLeaseNotFoundError(EtcdError):
    """The lease does not exist (expired or revoked), e.g. on a put with that lease."""


# -- conversion of etcd's gRPC errors (done once, in the transport) -------------------------

_AUTH_TEXT = (
    "authentication failed",
    "user name is empty",
    "invalid user id or password",
    "permission denied",
    "user name not found",
    "auth: ",
)


def error_from_rpc(e: grpc.RpcError, where: str) -> EtcdError:
    """The EtcdError for an answer etcd (at ``where``) gave with a gRPC error status."""
    code = e.code()
    details = e.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    low = details.lower()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and any(phrase in low for phrase in _AUTH_TEXT)
    ):
        return EtcdAuthError(f"etcd at {where} refused: {details}", code=name)
    if "lease not found" in low:
        return EtcdLeaseNotFoundError(f"etcd at {where}: {details}", code=name)
    if "compacted" in low:
        return EtcdCompactedError(0, f"etcd at {where}: {details}")
    return EtcdError(f"etcd at {where}: {details} ({name})", code=name)


# -- classification of gRPC failure texts (shared by the client and its streams) ----------


def cause_of(details: str) -> str:
    """A short human-readable cause from a gRPC error text."""
    text = details or ""
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "handshake failed" in low:
        if "certificate_verify_failed" in low:
            return (
                "TLS handshake failed: server certificate not trusted "
                "(check ca_cert; CERTIFICATE_VERIFY_FAILED)"
            )
        if "bad_certificate" in low or "certificate_required" in low or "handshake_failure" in low:
            return (
                "TLS handshake failed: server rejected the client certificate "
                "(missing, or not signed by a CA the server trusts)"
            )
        tail = text[low.index("handshake failed") + len("handshake failed") :].strip(" :")
        return f"TLS handshake failed: {tail}" if tail else "TLS handshake failed"
    if "handshake read failed" in low:
        # A TLS client whose server hung up mid-handshake (the client's probe tells whether
        # the server speaks TLS at all).
        return "TLS handshake failed: the server closed the connection"
    if "unwrap failed" in low or "tsi_data_corrupted" in low:
        # TLS 1.3: the server checks our certificate after the handshake and answers with an
        # alert, which gRPC reports as a record it cannot decrypt.
        return (
            "TLS session rejected by the server: client certificate missing or not signed "
            "by a CA the server trusts"
        )
    if "settings frame" in low or "timeout occurred" in low or "connect timeout" in low:
        return "connect timeout"
    if "errors resolving" in low or "dns resolution" in low or "domain name not found" in low:
        return "DNS resolution failed"
    if "socket closed" in low:
        return (
            "connection closed (a TLS server reached without TLS?)"
            if "failed to connect" in low
            else "connection closed"
        )
    if "etcdserver:" in text:
        return text[text.index("etcdserver:") :]
    match = re.search(r"last error: (?:\w+: )?(?:[\w.:\[\]-]+: )?(.*)$", text)
    return match.group(1) if match else text


def is_tls_failure(details: str) -> bool:
    low = details.lower()
    return "handshake failed" in low or "unwrap failed" in low or "tsi_data_corrupted" in low


# etcd's answers that a request was turned away before it reached the raft log (so it was not
# applied and may be sent again), and those after which its outcome is unknown.
_REJECTED_UNAPPLIED = (
    "etcdserver: too many requests",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "database space exceeded",
)
_OUTCOME_UNKNOWN = (
    "etcdserver: leader changed",
    "etcdserver: request timed out",
    "etcdserver: server stopped",
)
NO_SPACE_REMEDY = (
    "etcdserver: mvcc: database space exceeded (its NOSPACE alarm is raised: compact and "
    "defragment etcd, then disarm the alarm; docs/cluster.md)"
)


def busy_cause(details: str) -> str | None:
    """What an etcd answer says about its load, when it says etcd is busy or out of space
    rather than that the request is wrong: such a request may succeed later."""
    low = details.lower()
    if "database space exceeded" in low:
        return NO_SPACE_REMEDY
    for text in (*_REJECTED_UNAPPLIED, *_OUTCOME_UNKNOWN):
        if text in low:
            return text
    return None


def never_sent(details: str) -> bool:
    # The request provably did not reach etcd's state machine: safe to send elsewhere.
    low = details.lower()
    return (
        "failed to connect to all addresses" in low
        or "errors resolving" in low
        or any(text in low for text in _REJECTED_UNAPPLIED)
    )


def is_silent_endpoint(cause: str) -> bool:
    """Whether a failure's cause (`cause_of`) is silence (a timeout), as opposed to a refusal,
    a name that does not resolve or a rejected TLS handshake. A connect timeout may also be a
    dropped route: the transport checks that with a TCP probe."""
    return cause == "connect timeout" or cause.startswith("no answer within")


def is_connect_failure(details: str) -> bool:
    low = details.lower()
    return "failed to connect to all addresses" in low or "errors resolving" in low


def token_expired(details: str) -> bool:
    low = details.lower()
    return "invalid auth token" in low or "auth store is old" in low
