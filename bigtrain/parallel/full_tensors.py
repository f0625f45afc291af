"""The one loader of full tensors by name into an engine's layout: `model.init_from` and a distillation teacher.

Every engine is handed {state-dict name: full tensor}, read lazily from a checkpoint one tensor at a time. Here the
names are walked once, in the mapping's order (the same on every rank): rank 0 alone reads each tensor, and the
engine's `write(target, full, dist)` puts it where that engine keeps it — whole on every rank (single, ddp, ZeRO-1/2,
buffers: `write_whole`, a broadcast), each rank its rows (fsdp: a scatter), or ZeRO-3's partitions (gathered,
written on rank 0, re-partitioned). `full` is None on the other ranks. So a checkpoint is read once per job, whatever
the strategy and world size, and beside its model a rank holds at most one full tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as torch_dist

from bigtrain.parallel.dist import Dist

WriteFull = Callable[[torch.Tensor, "torch.Tensor | None", Dist], None]  # (target, full on rank 0 else None, dist)


def load_full_tensors(targets: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], write: WriteFull,
                      dist: Dist) -> None:
    """Each tensor of `weights` into `targets[name]` through `write` (collective: every rank calls it)."""
    with torch.no_grad():
        for name in weights:
            write(targets[name], weights[name] if dist.is_main else None, dist)


def write_whole(target: torch.Tensor, full: torch.Tensor | None, dist: Dist) -> None:
    """A WriteFull for a tensor every rank holds whole: rank 0 copies `full` in (cast to the target's dtype), then
    broadcasts it into the other ranks' copies."""
    target = target.data  # a Parameter's storage, written without autograd
    if dist.is_main:
        assert full is not None  # rank 0 is given the full tensor (WriteFull)
        target.copy_(full)
    if dist.distributed:
        buffer = target if target.is_contiguous() else target.contiguous()
        torch_dist.broadcast(buffer, src=0)
        if buffer is not target:
            target.copy_(buffer)
