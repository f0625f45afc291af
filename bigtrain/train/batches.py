"""The batches each step trains on: this rank's micro-batches of the global batch (fetch_micro_batches), made a
step ahead on a thread of their own and, on CUDA, copied to the device on a stream of their own (Prefetch)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

import torch

from bigtrain.data import GlobalSampler

if TYPE_CHECKING:
    from bigtrain.train.context import LoopContext


def rank_sampler(ctx: LoopContext) -> GlobalSampler:
    """The training order of the whole job and this rank's share of each global batch."""
    cfg, dist = ctx.cfg, ctx.dist
    return GlobalSampler(len(ctx.train_data), seed=cfg.run.seed, global_batch_size=cfg.train.global_batch_size,
                         micro_batch_size=cfg.train.micro_batch_size, rank=dist.rank, world_size=dist.world_size,
                         ordered=getattr(ctx.train_data, "ordered", False))  # a mixture orders its own samples


class Prefetch:
    """The next step's micro-batches made on a thread of their own while this step runs: `ahead(position)`
    starts them, `get(position)` returns them (or makes them now, if another position was asked for). They
    are what `fetch(position)` gives, a function of the position only: the same batches in the same order,
    so resume and preemption stop and start at a step boundary as before (a batch made ahead for a step
    that never runs is dropped).

    On CUDA, `fetch` gives host tensors; the thread pins them and issues their copies to `device` on a stream of
    its own, so the copy of step N+1's input overlaps step N's kernels instead of queueing behind them (a copy
    from pageable memory also blocks the thread until it is done). `get` makes the compute stream wait for those
    copies (an event, not a host sync) and marks the tensors as used there, so their memory is not reused early."""

    def __init__(self, fetch: Callable[[int], list[dict]], device: torch.device | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.fetch, self.device = fetch, device
        self.copies = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigtrain-batches")
        self.pending: tuple[int, Future] | None = None  # (position, the batches being made)

    def _make(self, position: int) -> tuple[list[dict], object]:
        batches = self.fetch(position)
        if self.copies is None:
            return batches, None
        with torch.cuda.stream(self.copies):
            moved = [{k: v.pin_memory().to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                      for k, v in batch.items()} for batch in batches]
        return moved, self.copies.record_event()

    def ahead(self, position: int) -> None:
        self.pending = (position, self.pool.submit(self._make, position))

    def get(self, position: int) -> list[dict]:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == position:
            batches, copied = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()  # made for a step that will not run (if it has not started yet)
            batches, copied = self._make(position)
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for batch in batches:
                for value in batch.values():
                    if isinstance(value, torch.Tensor):
                        value.record_stream(compute)
        return batches

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def fetch_micro_batches(ctx: LoopContext, sampler: GlobalSampler, consumed: int) -> list[dict]:
    """This rank's collated micro-batches of the global batch starting at position `consumed`: on the device, or
    on the host when it is CUDA (Prefetch copies them). Each sample's key for the task is its global position in
    the training order."""
    micro = ctx.cfg.train.micro_batch_size
    first = consumed + ctx.dist.rank * (ctx.cfg.train.global_batch_size // ctx.dist.world_size)
    device = torch.device("cpu") if ctx.dist.device.type == "cuda" else ctx.dist.device
    return [ctx.task.collate([ctx.train_data[int(i)] for i in indices], range(first + j * micro, first + (j + 1) * micro),
                             device)
            for j, indices in enumerate(sampler.rank_micro_batches(consumed))]
