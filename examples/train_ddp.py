"""A small, real DDP training: run it with `rdzv-launch --standalone --nproc-per-node=2 examples/train_ddp.py`.

A few linear layers learn a fixed random linear map from synthetic data. gloo on CPU, nccl when
GPUs are visible. Rank 0 checkpoints every epoch to --checkpoint-dir and every rank resumes from
the checkpoint on start, so a restarted group (--max-restarts) continues where it stopped. With
the same world size and --seed the printed losses are the same on every run, resumed or not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

CHECKPOINT = "checkpoint.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="save/resume here (off if not given)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument(
        "--fail-at-epoch",
        type=int,
        default=None,
        help="rank 0 crashes at the start of this epoch on the first attempt (to try --max-restarts)",
    )
    return p.parse_args(argv)


def make_data(args: argparse.Namespace) -> TensorDataset:
    # The same seed gives every rank the same dataset; the sampler shards it.
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.samples, args.features, generator=g)
    w = torch.randn(args.features, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(args.samples, 1, generator=g)
    return TensorDataset(x, y)


def make_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    return nn.Sequential(
        nn.Linear(args.features, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 1),
    )


def save_checkpoint(
    path: Path, epoch: int, loss: float, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"epoch": epoch, "loss": loss, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(state, tmp)
    # Atomic: a crash while saving leaves the previous checkpoint intact.
    os.replace(tmp, path)


def choose_device(local_rank: int) -> tuple[torch.device, str]:
    """This worker's device and process-group backend: its own GPU (the local rank's, wrapping
    round when there are fewer GPUs than workers) with nccl, else the CPU with gloo."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device, "nccl"
    return torch.device("cpu"), "gloo"


@record
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, backend = choose_device(int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device.type == "cuda"
    # device_id binds NCCL's communicator to this GPU (no guessing in barrier()).
    dist.init_process_group(backend, device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    data = make_data(args)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    model = make_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    start_epoch, loss = 1, float("nan")
    ckpt = args.checkpoint_dir / CHECKPOINT if args.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, loss = state["epoch"] + 1, state["loss"]
        if rank == 0:
            print(f"resumed from {ckpt} after epoch {state['epoch']}", flush=True)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    loss_fn = nn.MSELoss()
    started = time.perf_counter()
    for epoch in range(start_epoch, args.epochs + 1):
        if args.fail_at_epoch == epoch and restart == 0 and rank == 0:
            raise RuntimeError(f"simulated failure at epoch {epoch} (--fail-at-epoch)")
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            batch_loss = loss_fn(ddp(x), y)
            batch_loss.backward()
            optimizer.step()
            total += torch.stack([batch_loss.detach() * len(x), torch.tensor(float(len(x)), device=device)])
        # Mean over every sample of the epoch, all ranks together.
        dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        if rank == 0:
            print(f"epoch {epoch}/{args.epochs} loss={loss:.6f}", flush=True)
            if ckpt is not None:
                save_checkpoint(ckpt, epoch, loss, model, optimizer)
        if ckpt is not None:
            # Nobody moves on (or exits) before the epoch's checkpoint is on disk.
            dist.barrier()
    if rank == 0:
        print(f"trained epochs {start_epoch}..{args.epochs} on {world} worker(s) in {time.perf_counter() - started:.2f} s")
        print(f"final_loss={loss:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13 + gloo: gloo's worker threads free finished collectives' tensors late, and
    # doing so needs the GIL; if that happens while the interpreter shuts down, a successful
    # worker aborts ("terminate called without an active exception", exit -6). The process
    # group is destroyed by now, so skip the interpreter's shutdown. Not under --run-path: there
    # the script runs inside torch's worker function, which must still send back its result.
    if multiprocessing.parent_process() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
