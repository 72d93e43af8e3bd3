"""The default `--node-segment` on NVIDIA machines: the GPUs' NVLink cluster UUID, from NVML.

GB200 NVL72-style racks report, per GPU, the fabric (cluster) UUID of the NVLink domain it is
in; nodes of one rack share it, so labelling nodes with it groups each rack into one segment
(rdzv.rendezvous.segments). pynvml is used when it is importable and never required: without it,
without NVML, or without a completed fabric registration, there is no default label.
"""

from __future__ import annotations

import contextlib
import ctypes
import uuid
from typing import Any

FABRIC_COMPLETED = 3  # NVML_GPU_FABRIC_STATE_COMPLETED


def nvlink_segment() -> str | None:
    """The one cluster UUID every visible GPU reports, or None (none, several, or no NVML)."""
    try:
        import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: nothing to label
        return None
    try:
        clusters = {_cluster_uuid(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())}
    except Exception:  # an old driver or pynvml without fabric info
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    clusters.discard(None)
    return clusters.pop() if len(clusters) == 1 else None


def _cluster_uuid(pynvml: Any, index: int) -> str | None:
    info = pynvml.nvmlDeviceGetGpuFabricInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
    if info.state != FABRIC_COMPLETED:
        return None
    # clusterUuid is a c_char array: read as an attribute it stops at the first zero byte.
    field = type(info).clusterUuid
    raw = ctypes.string_at(ctypes.addressof(info) + field.offset, 16)
    return str(uuid.UUID(bytes=raw)) if any(raw) else None
