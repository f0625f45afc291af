"""Process-group setup and the few collectives the loop needs (rank, world, device, backend)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str = "auto", *, timeout_s: float = 1800) -> Dist:
    """Read torchrun's environment, pick the device, and init the process group when world > 1.

    nccl on GPU, gloo on CPU. A single process (no WORLD_SIZE) runs without a process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not torch_dist.is_initialized():
            kwargs = {"device_id": dev} if use_cuda else {}
            torch_dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
            )
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def barrier(dist: Dist) -> None:
    if dist.distributed:
        torch_dist.barrier()


def all_reduce_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(dist: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(dist: Dist) -> None:
    if dist.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
