"""Entry points for stock torchrun (`torchrun.handlers` group).

torch calls each entry point with no arguments and registers the returned creator under the
entry point's name, so this module must stay cheap to import: the backend loads on first use.
"""

from __future__ import annotations

from rdzv.registry import HandlerCreator, create_handler


def etcd_v3_creator() -> HandlerCreator:
    """`torchrun --rdzv-backend=etcd-v3`: our etcd v3 handler."""
    return create_handler
