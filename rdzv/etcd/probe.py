"""Which protocol an endpoint speaks, asked directly when gRPC's error leaves it open.

gRPC reports a TLS/plain mismatch only as "Socket closed" (a plain client at a TLS server) or
"Handshake read failed" (a TLS client at a plain server), the same words it uses for a server
that is restarting. One short probe tells them apart: a TLS server answers a ClientHello (with
its certificate, or an alert when it wants ours), a plain gRPC server answers the HTTP/2
preface with a SETTINGS frame. Each probe is one connection, bounded by `timeout`.
"""

from __future__ import annotations

import socket
import ssl

# The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
PROBE_TIMEOUT = 1.0  # the most one probe waits (callers bound it by their connect timeout)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def accepts_connections(address: str, timeout: float) -> bool:
    """Whether `address` accepts a TCP connection within `timeout`: a member that does but
    then answers nothing is stalled (worth waiting for); one that does not is out of reach or
    not there (a dropped route, a wrong address)."""
    try:
        with socket.create_connection(_host_port(address), timeout=timeout):
            return True
    except OSError:
        return False


def speaks_tls(address: str, timeout: float) -> bool | None:
    """True when the server at `address` answers a TLS ClientHello (even with an alert: it
    wants a client certificate), False when it answers otherwise or hangs up, None when it
    cannot be reached or does not answer within `timeout`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol matters here, not whom we talk to
    try:
        with socket.create_connection(_host_port(address), timeout=timeout) as raw:
            try:
                with context.wrap_socket(raw):
                    return True
            except ssl.SSLEOFError:
                return False  # hung up on the ClientHello: not a TLS server
            except ssl.SSLError as exc:
                # An alert is TLS talking; "wrong version number" and the like are not.
                return "alert" in str(exc).lower()
    except (TimeoutError, OSError):
        return None


def speaks_plain_http2(address: str, timeout: float) -> bool | None:
    """True when the server at `address` answers the HTTP/2 preface with a SETTINGS frame (a
    plain gRPC server), False when it answers otherwise or hangs up, None when it cannot be
    reached or does not answer within `timeout`."""
    try:
        with socket.create_connection(_host_port(address), timeout=timeout) as sock:
            sock.sendall(_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
            return head[3] == _SETTINGS
    except (TimeoutError, OSError):
        return None


def mismatch_hint(address: str, client_tls: bool, timeout: float) -> str | None:
    """What to change when the server at `address` speaks TLS and the client does not, or the
    reverse (None: it does not look like that, or the server did not say)."""
    if client_tls and speaks_plain_http2(address, timeout):
        return (
            f"etcd at {address} does not speak TLS, but this client does (https:// endpoint, "
            f"protocol=https, cacert, cert or key): use http://{address} without the TLS "
            "settings, or turn TLS on in etcd"
        )
    if not client_tls and speaks_tls(address, timeout):
        return (
            f"etcd at {address} speaks TLS, but this client does not: use https://{address} "
            "with cacert= (and cert=/key= if etcd asks for client certificates)"
        )
    return None
