"""Backend names -> handler creators, shared by the library API, the launcher and torchrun's plugin hook."""

from __future__ import annotations

from collections.abc import Callable

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

HandlerCreator = Callable[[RendezvousParameters], RendezvousHandler]


def _etcd_v3(params: RendezvousParameters) -> RendezvousHandler:
    from rdzv.backends.etcd_v3 import create_handler

    return create_handler(params)


def _torch_builtin(name: str) -> HandlerCreator:
    # Stop-gap until our own etcd-v2/c10d/static backends land: torch's own handlers.
    def create(params: RendezvousParameters) -> RendezvousHandler:
        from torch.distributed.elastic.rendezvous import registry as torch_registry

        return torch_registry.handler_registry.create_handler(params)

    create.__name__ = f"torch_{name}"
    return create


BACKENDS: dict[str, HandlerCreator] = {
    "etcd": _etcd_v3,
    "etcd-v3": _etcd_v3,
    "etcd-v2": _torch_builtin("etcd-v2"),
    "c10d": _torch_builtin("c10d"),
    "static": _torch_builtin("static"),
}


def backend_names() -> list[str]:
    """Names accepted by `create_handler` (and `rdzv-launch --rdzv-backend`)."""
    return ["etcd", "etcd-v2", "c10d", "static"]


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """Create the rendezvous handler named by ``params.backend``."""
    try:
        creator = BACKENDS[params.backend]
    except KeyError:
        raise ValueError(
            f"unknown rendezvous backend {params.backend!r}; choose one of {', '.join(backend_names())}"
        ) from None
    return creator(params)
