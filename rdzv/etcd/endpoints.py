"""Where the etcd members are and how each is dialled.

Endpoint strings are parsed into :class:`Endpoint` (address and whether it speaks TLS); a
:class:`Channel` is one gRPC channel to one endpoint with its stubs, created once and reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rdzv.endpoints import join_host_port, split_endpoint
from rdzv.etcd.proto import etcd_min_pb2_grpc as pbg

DEFAULT_PORT = 2379


@dataclass(frozen=True)
class Endpoint:
    """One etcd member as given: ``address`` is host:port as dialled (and shown in errors)."""

    address: str
    secure: bool


def parse_endpoints(endpoints: Sequence[str] | str, tls: bool | None) -> list[Endpoint]:
    """Items as `rdzv.endpoints.split_endpoint` reads them, as a list or a comma-separated
    string (empty items skipped); the port defaults to 2379, and an item uses TLS when it is an
    https:// URL or ``tls`` is true. Raises ValueError for a malformed item or an empty list."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[Endpoint] = []
    for raw in items:
        for item in raw.split(","):
            if not item.strip():
                continue
            host, port, scheme = split_endpoint(item, DEFAULT_PORT)
            parsed.append(Endpoint(join_host_port(host, port), scheme == "https" or bool(tls)))
    if not parsed:
        raise ValueError("no etcd endpoints given")
    return parsed


def channel_options(connect_timeout: float) -> list[tuple[str, Any]]:
    """gRPC channel options: message limits, reconnect pacing and HTTP/2 keepalives."""
    return [
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # Bound one connection attempt (TCP + TLS + HTTP/2 settings) by connect_timeout.
        ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # Detect half-dead connections under long-lived streams; etcd allows >= 5 s.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def tls_credentials(
    ca_cert: str | None, cert: str | None, key: str | None
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files (None: the system's CAs, no client certificate)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read etcd {what} {path!r}: {e.strerror}") from None


class Channel:
    """A gRPC channel to one endpoint plus its stubs (created once, reused for every call)."""

    def __init__(
        self,
        endpoint: Endpoint,
        creds: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> None:
        self.address = endpoint.address
        if endpoint.secure:
            if creds is None:
                creds = grpc.ssl_channel_credentials()
            self.channel = grpc.secure_channel(endpoint.address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(endpoint.address, options=options)
        self.kv = pbg.KVStub(self.channel)
        self.watch = pbg.WatchStub(self.channel)
        self.lease = pbg.LeaseStub(self.channel)
        self.auth = pbg.AuthStub(self.channel)
        self.maintenance = pbg.MaintenanceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
