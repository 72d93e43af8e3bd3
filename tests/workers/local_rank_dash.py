"""Style (b): a script written for torch 2.x's `python -m torch.distributed.launch`.

The launcher passes `--local-rank=N` (dash spelling); the script requires it, as in the
torch.distributed.launch docs, and accepts the old underscore spelling too.

Run by tests/test_user_commands.py as `main.py`; it writes what it saw to
$RESULTS_DIR/rank<R>.json.
"""

import argparse
import json
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist


def save_result(rank: int, result: dict) -> None:
    path = os.path.join(os.environ["RESULTS_DIR"], f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-rank", "--local_rank", type=int, required=True)
    args = parser.parse_args()

    dist.init_process_group(backend="gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)

    save_result(rank, {
        "style": "b", "rank": rank, "world_size": world_size, "local_rank": args.local_rank,
        "sum": total.item(), "argv": sys.argv[1:],
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")},
    })
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13 + gloo can abort at interpreter exit: skip the shutdown (see docs/launcher.md).
    if multiprocessing.parent_process() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
