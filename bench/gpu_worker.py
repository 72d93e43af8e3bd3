"""The worker bench/gpu_check.sh restarts: NCCL on this worker's GPU, one failure, timed.

    gpu_worker.py OUT            as a worker (under rdzv-launch or torchrun): writes
                                 OUT/<restart>_<rank>.json with wall-clock times
    gpu_worker.py --phases OUT   prints the recovery phases of the records in OUT

Each worker notes when its process started (before torch is imported), picks its GPU as the
main example does, initialises NCCL and completes one all_reduce ("ready"). On the first attempt
rank 0 then fails (exit 1) while the others wait in a barrier, as a real job's would; on the
restart every rank completes a second all_reduce and exits 0. The phases are: from the failure
to the first worker of the new attempt starting (the launcher's detection, stop, rendezvous and
spawn), then from there to the last worker ready (CUDA and NCCL initialisation).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: torch's import is part of a worker's start-up

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _record(out: Path, restart: int, rank: int, **fields: float | int | str) -> None:
    path = out / f"{restart}_{rank}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def work(out: Path) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_ddp import choose_device

    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    device, backend = choose_device(int(os.environ["LOCAL_RANK"]))
    _record(out, restart, rank, started=STARTED, device=str(device), backend=backend)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _record(out, restart, rank, ready=time.time(), world=dist.get_world_size())
    if restart == 0:
        if rank == 0:
            _record(out, restart, rank, failed=time.time())
            sys.stdout.flush()
            os._exit(1)  # a crash: no clean-up, the others are left waiting
        dist.barrier()  # never completes: the agent stops this worker
    dist.all_reduce(t)
    dist.destroy_process_group()


def phases(out: Path) -> tuple[float, float, int]:
    """(failure -> first new worker started, that -> last new worker ready, workers) in seconds."""
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*_*.json")}
    failed = [r["failed"] for name, r in records.items() if name.startswith("0_") and "failed" in r]
    again = [r for name, r in records.items() if name.startswith("1_")]
    if not failed:
        raise ValueError(f"no worker of the first attempt recorded its failure in {out}")
    if not again or any("ready" not in r for r in again):
        raise ValueError(f"the restarted workers did not all get ready in {out} ({len(again)} started)")
    first_start = min(r["started"] for r in again)
    last_ready = max(r["ready"] for r in again)
    return first_start - failed[0], last_ready - first_start, len(again)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--phases":
        try:
            restart, init, workers = phases(Path(argv[1]))
        except ValueError as exc:
            print(exc)
            return 1
        print(f"failure -> new workers {restart:.2f} s, CUDA/NCCL init {init:.2f} s ({workers} worker(s))")
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    work(Path(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
