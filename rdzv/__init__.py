"""rdzv: rendezvous handlers for torch.distributed.elastic over etcd v3 (and friends).

    from rdzv import create_handler
    handler = create_handler(RendezvousParameters("etcd", "etcd:2379", "job42", 2, 4))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rdzv.registry import backend_names, create_handler

if TYPE_CHECKING:
    from rdzv.rendezvous.handler import RdzvHandler
    from rdzv.rendezvous.settings import RendezvousSettings

__all__ = ["RdzvHandler", "RendezvousSettings", "backend_names", "create_handler"]


def __getattr__(name: str) -> object:
    # Lazy: importing rdzv (e.g. from torchrun's plugin scan) must not pull in gRPC.
    if name == "RdzvHandler":
        from rdzv.rendezvous.handler import RdzvHandler

        return RdzvHandler
    if name == "RendezvousSettings":
        from rdzv.rendezvous.settings import RendezvousSettings

        return RendezvousSettings
    raise AttributeError(name)
