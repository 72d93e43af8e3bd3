"""Who serves the c10d store, by torch's rules, and the connection each node gets to it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.c10d.store import OpCounts, StoreConnection, connect_store, serve_store
from rdzv.hosts import is_this_host
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings

log = logging.getLogger("rdzv")

SPOF_HINT = (
    ". The c10d store lives in the process of the node that hosts it; without it the "
    "rendezvous cannot go on (the etcd backends have no such single point of failure)."
)

Opener = Callable[[OpCounts], StoreConnection]


def single_endpoint(settings: RendezvousSettings, backend: str) -> tuple[str, int]:
    """The one HOST:PORT a TCPStore backend takes (no TLS, no authentication)."""
    if len(settings.endpoints) != 1:
        raise ConfigError(f"the {backend} backend takes one HOST:PORT endpoint, got {','.join(settings.endpoints)}")
    if settings.access.secured:
        raise ConfigError(
            f"the {backend} backend has no TLS or authentication (TCPStore offers neither); "
            "use the etcd backend for that"
        )
    host, _, port = settings.endpoints[0].rpartition(":")
    return host, int(port)


def open_c10d(settings: RendezvousSettings, is_host: bool | None) -> tuple[Opener, str]:
    """torch's rules for who serves the store: `is_host` if given (--rdzv-conf), else the node
    whose host name or address is the endpoint's (port 0: this node, for single-node runs). A
    node that would host but finds the port taken (another agent on this machine got there
    first) connects. Returns the opener of this node's connection and where the store is, for
    messages."""
    host, port = single_endpoint(settings, "c10d")
    hosting = is_host
    if hosting is None:
        hosting = port == 0 or is_this_host(host)
    if hosting:
        try:
            store = serve_store(port, settings.read_timeout)
        except RuntimeError as exc:
            if is_host:
                raise RendezvousConnectionError(
                    f"c10d: cannot serve the store on port {port} (is_host=true): {exc}"
                ) from exc
            log.info("c10d store port %d is taken on this machine; connecting to it instead", port)
        else:
            where = f"c10d store {host}:{store.port} (served by this node)"
            return _opener(store, where), where
    if port == 0:
        raise ConfigError("c10d endpoint port 0 means 'pick a free port' and works only on the node that hosts the store")
    where = f"c10d store {host}:{port}"
    store = connect_store(
        host, port, settings.read_timeout, where=where,
        advice="Is the node that serves it running? (read_timeout bounds the connect)",
    )
    return _opener(store, where), where


def _opener(store: TCPStore, where: str) -> Opener:
    return lambda counts: StoreConnection(store, where, counts, hint=SPOF_HINT)
