"""Style (c): the torchrun way. Everything comes from the environment.

Run by tests/test_user_commands.py as `main.py`; it writes what it saw to
$RESULTS_DIR/rank<R>.json.
"""

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
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)

    save_result(rank, {
        "style": "c", "rank": rank, "world_size": world_size, "local_rank": local_rank,
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
