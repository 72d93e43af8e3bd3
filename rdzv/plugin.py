"""Entry points for stock torchrun (`torchrun.handlers` group).

torch calls each entry point with no arguments and registers the returned creator under the
entry point's name, so this module must stay cheap to import: the backend loads on first use.
The names differ from torch's built-ins (`etcd-v2`, `c10d`, `static`), which a plugin cannot
replace. Each creator builds its own backend whatever name torchrun was given, and the handler's
`get_backend()` returns that name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# torch imports this module while its rendezvous package is still initialising (that is when it
# scans entry points), so nothing here may import rdzv.registry or torch at module level.
HandlerCreator = Callable[[Any], Any]


def _create(params: Any) -> Any:  # noqa: ANN401 - torch's RendezvousParameters -> handler
    from rdzv.registry import create_handler

    return create_handler(params)


def etcd_v3_creator() -> HandlerCreator:
    """`torchrun --rdzv-backend=etcd-v3`: our etcd v3 handler."""
    return _create


def etcd_v2_creator() -> HandlerCreator:
    """`torchrun --rdzv-backend=rdzv-etcd-v2`: our etcd v2 handler."""
    return _create


def c10d_creator() -> HandlerCreator:
    """`torchrun --rdzv-backend=rdzv-c10d`: our TCPStore handler."""
    return _create


def static_creator() -> HandlerCreator:
    """`torchrun --rdzv-backend=rdzv-static --rdzv-conf=rank=N`: our static handler (torchrun
    passes --node-rank only to its own `static`, so give the rank in --rdzv-conf)."""
    return _create
