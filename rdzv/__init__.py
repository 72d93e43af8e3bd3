"""rdzv: rendezvous handlers for torch.distributed.elastic over etcd v3 (and friends).

    from rdzv import create_handler
    handler = create_handler(RendezvousParameters("etcd", "etcd:2379", "job42", 2, 4))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rdzv.registry import backend_names, create_handler
    from rdzv.rendezvous.handler import RdzvHandler
    from rdzv.rendezvous.settings import RendezvousSettings

__all__ = ["RdzvHandler", "RendezvousSettings", "backend_names", "create_handler"]


_LAZY = {
    "create_handler": "rdzv.registry",
    "backend_names": "rdzv.registry",
    "RdzvHandler": "rdzv.rendezvous.handler",
    "RendezvousSettings": "rdzv.rendezvous.settings",
}


def __getattr__(name: str) -> object:
    # Lazy: `import rdzv.etcd` must not pull in torch, nor torchrun's plugin scan gRPC.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
