"""Backend names -> handlers, built in one place for the library API, the launcher and torchrun's
plugin hook: parse the settings, the backend module's `create_backend(settings)`, a handler.

Torch-free at import (the launcher checks backend names before torch loads): a backend's
modules load on first use, so python-etcd, gRPC and TCPStore hosting are only paid for by the
backend a job picks.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rdzv.rendezvous.settings import RendezvousSettings, parse_settings
from rdzv.torch_support import check_torch

if TYPE_CHECKING:  # annotations only
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

    from rdzv.backends.api import Backend
    from rdzv.rendezvous.handler import RdzvHandler


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives: its module (exporting `create_backend`), its endpoint's default
    port, and the handler class in that module when it needs more than `RdzvHandler`."""

    module: str
    default_port: int
    handler: str | None = None


_ETCD_V3 = BackendEntry("rdzv.backends.etcd_v3.backend", 2379)
_ETCD_V2 = BackendEntry("rdzv.backends.etcd_v2.backend", 2379)
_C10D = BackendEntry("rdzv.backends.c10d.backend", 29400)
_STATIC = BackendEntry("rdzv.backends.static.backend", 29500, handler="StaticHandler")

BACKENDS: dict[str, BackendEntry] = {
    "etcd": _ETCD_V3,
    "etcd-v3": _ETCD_V3,
    "etcd-v2": _ETCD_V2,
    "c10d": _C10D,
    "static": _STATIC,
    # The names our torchrun entry points register (torch's own names stay torch's).
    "rdzv-etcd-v2": _ETCD_V2,
    "rdzv-c10d": _C10D,
    "rdzv-static": _STATIC,
}


def backend_names() -> list[str]:
    """Names accepted by `create_handler` (and `rdzv-launch --rdzv-backend`)."""
    return ["etcd", "etcd-v2", "c10d", "static"]


def create_handler(params: RendezvousParameters, *, config_checked: bool = False) -> RendezvousHandler:
    """Create the rendezvous handler named by ``params.backend``.

    Raises ValueError (ConfigError for settings: run id, --rdzv-conf keys and values, endpoints)
    before the backend loads or anything is written, and UnsupportedTorchError on a torch
    outside the supported range (rdzv.torch_support). ``config_checked``: the caller checked
    ``params.config`` already (rdzv-launch does, once); see ``parse_settings``.
    """
    check_torch()
    try:
        entry = BACKENDS[params.backend]
    except KeyError:
        raise ValueError(
            f"unknown rendezvous backend {params.backend!r}; choose one of {', '.join(backend_names())}"
        ) from None
    # Checked here for every entry point (library, torchrun plugins, rdzv-launch), before the
    # backend's modules load: run id first, then --rdzv-conf (unless the caller checked it).
    settings = parse_settings(params, default_port=entry.default_port, config_checked=config_checked)
    from rdzv.rendezvous.handler import RdzvHandler  # noqa: F811 - torch: only once a handler is wanted

    module = importlib.import_module(entry.module)
    handler_class: type[RdzvHandler] = getattr(module, entry.handler) if entry.handler else RdzvHandler
    return start_handler(settings, lambda: module.create_backend(settings), handler_class)


def start_handler(
    settings: RendezvousSettings,
    create_backend: Callable[[], Backend],
    handler_class: type[RdzvHandler],
) -> RdzvHandler:
    """Connect, make the handler and open this node's session. A store that is reached but
    busy or silent (StoreBusyError: a stall, a leader election, an overloaded etcd) is waited
    for until join_timeout, saying so: thousands of nodes start in the same second, and the
    ones that start during a hiccup must not exit. A refused connection, an unknown host, TLS
    and auth errors still end it at once."""
    from rdzv.backends.api import StoreBusyError
    from rdzv.rendezvous.outage import ride_out

    backend: Backend | None = None

    def start() -> RdzvHandler:
        nonlocal backend
        if backend is None:
            backend = create_backend()  # connected: not made again on a retry
        backend.open_session()
        return handler_class(settings, backend)

    # Its own join_timeout, before the join's: a node that starts during a stall may wait up
    # to twice join_timeout in all (docs/rendezvous.md).
    deadline = time.monotonic() + settings.join_timeout
    return ride_out(
        start, lambda: deadline, run_id=settings.run_id, where=_where(settings),
        join_timeout=settings.join_timeout, retried=StoreBusyError,
    )


def _where(settings: RendezvousSettings) -> str:
    return f"{settings.backend} {','.join(settings.endpoints)}"
