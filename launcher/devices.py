"""How many workers a node runs: `--nproc-per-node` resolved as torchrun resolves it (device
words ask torch; a number does not), and the check that refuses a count far above the machine
unless `--allow-oversubscribe`."""

from __future__ import annotations

import os
from typing import Any

from launcher.problems import UsageProblem


def resolve_nproc(spec: str) -> int:
    """Workers per node, as torchrun counts them. Only device words ask torch about devices
    (CUDA stays untouched otherwise); 'gpu' and 'auto' count any accelerator torch knows
    (CUDA, XPU, a privateuse1 backend), and a backend's own name counts its devices."""
    if spec.isdigit():
        return int(spec)
    if spec == "cpu":
        return _cpu_count()
    import torch

    if spec in ("auto", "gpu"):
        count = _accelerator_count(torch)
        if count > 0:
            return count
        if spec == "auto":
            return _cpu_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise UsageProblem(f"--nproc-per-node=gpu but no GPU is visible{hint}")
    module = getattr(torch, spec, None) if spec in ("cuda", "xpu", _privateuse1_name(torch)) else None
    if module is None:
        raise UsageProblem(
            f"--nproc-per-node must be a number, auto, cpu, gpu, xpu or an accelerator torch knows, got {spec!r}"
        )
    count = module.device_count() if module.is_available() else 0
    if count < 1:
        raise UsageProblem(f"--nproc-per-node={spec} but no {spec} device is visible")
    return int(count)


# More workers than this many per CPU (and more than the accelerators) is almost always a typo
# (--nproc-per-node 100000) and would fork thousands of processes: refused unless confirmed.
OVERSUBSCRIBE_FACTOR = 4


def check_oversubscription(nproc: int, spec: str, allowed: bool) -> None:
    """Raise UsageProblem for a numeric --nproc-per-node above OVERSUBSCRIBE_FACTOR x the CPUs
    this process may use and above the visible accelerators, unless --allow-oversubscribe."""
    cpus = _cpu_count()
    if allowed or not spec.isdigit() or nproc <= OVERSUBSCRIBE_FACTOR * cpus:
        return
    import torch

    # Only on this path does a numeric --nproc-per-node ask torch about accelerators.
    accelerators = _accelerator_count(torch)
    if nproc <= accelerators:
        return
    raise UsageProblem(
        f"--nproc-per-node={nproc} is more than {OVERSUBSCRIBE_FACTOR}x this machine's {cpus} CPU(s) "
        f"and more than its {accelerators} accelerator(s); pass --allow-oversubscribe if you mean it"
    )


def _accelerator_count(torch: Any) -> int:
    """Visible devices of the current accelerator, whatever its kind (honours *_VISIBLE_DEVICES)."""
    accelerator = torch.accelerator
    return int(accelerator.device_count()) if accelerator.is_available() else 0


def _privateuse1_name(torch: Any) -> str:
    return str(torch._C._get_privateuse1_backend_name())


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
