"""Worker: joins the process group with gloo, all-reduces its rank, records what it saw."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(value)
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
            "TORCHELASTIC_RUN_ID"]
    record = {k: os.environ.get(k) for k in keys}
    record["sum"] = value.item()
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(record, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter shutdown: see examples/train_ddp.py (torch 2.13 + gloo abort at exit).
    if multiprocessing.parent_process() is None:  # not under --run-path
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
