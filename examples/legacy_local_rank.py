"""A script in the old torch.distributed.launch style: the local rank arrives as --local-rank.

Run it with `python -m launcher.legacy --nproc-per-node=2 examples/legacy_local_rank.py` or
`rdzv-launch --legacy-local-rank --nproc-per-node=2 examples/legacy_local_rank.py`.
New scripts should read os.environ["LOCAL_RANK"] instead (see docs/migration.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # torch < 2.0 passed --local_rank, later versions --local-rank: accept both.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, required=True)
    parser.add_argument("--out-dir", default=None, help="also write the rank's view to <out-dir>/<rank>.txt")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(args.local_rank)])
    dist.all_reduce(total)
    line = f"rank={rank} world_size={world} local_rank={args.local_rank} sum_of_local_ranks={total.item():g}"
    print(line, flush=True)
    if args.out_dir:
        with open(os.path.join(args.out_dir, f"{rank}.txt"), "w") as f:
            f.write(line + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter shutdown: see the note at the end of train_ddp.py (torch 2.13 + gloo).
    if multiprocessing.parent_process() is None:  # not under --run-path
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
