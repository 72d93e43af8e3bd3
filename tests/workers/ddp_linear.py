"""Style (e): a tiny DistributedDataParallel training loop.

Every rank starts from different weights and sees different data; DDP broadcasts rank 0's
weights at wrap time and averages the gradients, so after training the parameters (and their
checksum) must be the same on every rank.

Run by tests/test_user_commands.py as `main.py`; it writes what it saw to
$RESULTS_DIR/rank<R>.json.
"""

import json
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def save_result(rank: int, result: dict) -> None:
    path = os.path.join(os.environ["RESULTS_DIR"], f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(rank)  # different initial weights and data on every rank
    model = DDP(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())

    save_result(rank, {
        "style": "e", "rank": rank, "world_size": world_size, "local_rank": local_rank,
        "sum": total.item(), "checksum": checksum, "argv": sys.argv[1:],
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
