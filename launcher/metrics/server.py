"""Serve a prometheus_client registry on /metrics with a /healthz beside it, from daemon threads.

Shared by `rdzv exporter` and `rdzv-launch --metrics-port`. prometheus_client's WSGI app
renders each scrape in its own request thread (one per connection), so a scraper that stalls
holds only its own thread: metric updates and other scrapes go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

Health = Callable[[], tuple[bool, str]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is no news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def make_app(health: Health, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """/healthz answers `health()` (200 or 503, text); every other path is the metrics."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, text = health()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [text.encode() + b"\n"]
        return metrics(environ, start_response)

    return app


def start(host: str, port: int, health: Health, registry: CollectorRegistry, name: str) -> WSGIServer:
    """Listen now (OSError if the port is taken) and serve from a daemon thread named `name`;
    the bound port is `server.server_port`. Stop with `stop(server)`."""
    server = make_server(host, port, make_app(health, registry), _ThreadingServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def stop(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()
