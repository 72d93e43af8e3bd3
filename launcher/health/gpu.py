"""`rdzv-launch --health-check=builtin:gpu`: this node's accelerators work, or it stays out.

Run as `python -m launcher.health.gpu` (its own process: a hung device is killed with it at the
health check's timeout, and the launcher never holds a device context). On every visible
accelerator: allocate ALLOC_MIB of memory and check it was written, then a matrix product of
small integers, exact in any float format, compared with the CPU's. With several devices, one
all-reduce across them (one process per device, the device's own collective backend: NCCL on
CUDA). Each step's time is printed; without an accelerator it says so and passes. Exit 0: all
good; 1: the first failure, in one line.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from typing import Any

ALLOC_MIB = 256
MATMUL_SIZE = 512


def visible_devices(torch: Any) -> list[Any]:
    """Every device of the current accelerator (honours *_VISIBLE_DEVICES); [] without one."""
    accelerator = torch.accelerator
    if not accelerator.is_available():
        return []
    kind = accelerator.current_accelerator().type
    return [torch.device(kind, i) for i in range(accelerator.device_count())]


def _sync(torch: Any, device: Any) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def check_device(torch: Any, device: Any) -> float:
    """Allocate, write and read back memory, then check a matmul against the CPU's; seconds."""
    started = time.perf_counter()
    block = torch.ones(ALLOC_MIB * 2**20 // 4, dtype=torch.float32, device=device)
    if int(block.sum().item()) != block.numel():
        raise RuntimeError(f"{ALLOC_MIB} MiB written with ones do not read back as ones")
    del block
    gen = torch.Generator().manual_seed(0)
    # Integers in [-2, 2]: every product and sum is exact in float32, TF32 and bf16 alike.
    a = torch.randint(-2, 3, (MATMUL_SIZE, MATMUL_SIZE), generator=gen).float()
    b = torch.randint(-2, 3, (MATMUL_SIZE, MATMUL_SIZE), generator=gen).float()
    got = (a.to(device) @ b.to(device)).cpu()
    _sync(torch, device)
    if not torch.equal(got, a @ b):
        wrong = int((got != a @ b).sum().item())
        raise RuntimeError(f"matmul differs from the CPU's in {wrong} of {got.numel()} elements")
    return time.perf_counter() - started


def _reduce_one(rank: int, kind: str, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    device = torch.device(kind, rank) if kind != "cpu" else torch.device("cpu")
    if kind != "cpu":
        torch.accelerator.set_device_index(rank)
    backend = dist.Backend.default_device_backend_map.get(kind, "gloo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        value = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(value)
        expected = world * (world + 1) / 2
        if not bool((value == expected).all().item()):
            raise RuntimeError(f"all-reduce on {device} gave {value[0].item()}, not {expected}")
    finally:
        dist.destroy_process_group()


def all_reduce(kind: str, count: int) -> float:
    """One all-reduce across `count` devices of `kind`, one process each; seconds."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    mp.start_processes(_reduce_one, args=(kind, count, port), nprocs=count, start_method="spawn")
    return time.perf_counter() - started


def run(say: Callable[[str], None] = print) -> int:
    import torch

    devices = visible_devices(torch)
    if not devices:
        say("no accelerator visible: nothing to check (passed)")
        return 0
    for device in devices:
        try:
            seconds = check_device(torch, device)
        except Exception as exc:  # any failure of a device is the answer
            say(f"{device}: FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return 1
        say(f"{device}: {ALLOC_MIB} MiB and a {MATMUL_SIZE}x{MATMUL_SIZE} matmul checked in {seconds * 1000:.0f} ms")
    if len(devices) == 1:
        say("one device: no all-reduce to run")
    else:
        try:
            seconds = all_reduce(devices[0].type, len(devices))
        except Exception as exc:
            say(f"all-reduce across {len(devices)} devices: FAILED: {type(exc).__name__}: {str(exc).strip()[:200]}")
            return 1
        say(f"all-reduce across {len(devices)} {devices[0].type} devices in {seconds:.1f} s")
    say(f"{len(devices)} device(s) passed")
    return 0


if __name__ == "__main__":
    sys.exit(run(lambda line: print(line, flush=True)))
