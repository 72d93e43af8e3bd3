"""Backend names -> handler creators, shared by the library API, the launcher and torchrun's plugin hook."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from rdzv.rendezvous.settings import check_config, check_run_id

if TYPE_CHECKING:  # annotations only: the launcher checks backend names before torch loads
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

HandlerCreator = Callable[["RendezvousParameters"], "RendezvousHandler"]


def _lazy(module: str) -> HandlerCreator:
    # Backends load on first use: python-etcd, gRPC and TCPStore hosting are only paid for
    # by the backend a job picks.
    def create(params: RendezvousParameters) -> RendezvousHandler:
        return importlib.import_module(module).create_handler(params)  # type: ignore[no-any-return]

    create.__name__ = f"create_{module.rsplit('.', 1)[1]}_handler"
    return create


_ETCD_V3 = _lazy("rdzv.backends.etcd_v3")
_ETCD_V2 = _lazy("rdzv.backends.etcd_v2")
_C10D = _lazy("rdzv.backends.c10d")
_STATIC = _lazy("rdzv.backends.static")

BACKENDS: dict[str, HandlerCreator] = {
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


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create the rendezvous handler named by ``params.backend``.

    Raises ValueError (ConfigError for settings: run id, --rdzv-conf keys and values, endpoints)
    before the backend loads or anything is written.
    """
    try:
        creator = BACKENDS[params.backend]
    except KeyError:
        raise ValueError(
            f"unknown rendezvous backend {params.backend!r}; choose one of {', '.join(backend_names())}"
        ) from None
    # Checked here for every entry point (library, torchrun plugins, rdzv-launch), before the
    # backend's modules load; the backends check again through parse_settings.
    check_run_id(params.run_id)
    check_config(params.config)
    return creator(params)
