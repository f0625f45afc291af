"""Parallelism strategies behind one Protocol: wrap a finished model + optimizer into an Engine.

`parallel.strategy` picks the implementation from `STRATEGIES` (short names, never import paths).
`auto` means ddp when several processes were started, else single.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager, Protocol

import torch
from torch import nn

from bigtrain.strategy.dist import Dist, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from bigtrain.strategy.local import LocalEngine
from bigtrain.strategy.precision import PrecisionTable, precision_table

__all__ = [
    "Dist", "Engine", "PrecisionTable", "STRATEGIES", "all_reduce_sum", "barrier", "broadcast_object",
    "build_engine", "init_distributed", "precision_table", "resolve_strategy", "shutdown",
]


class Engine(Protocol):
    module: nn.Module                 # the bare model (state dicts, FLOPs)
    model: nn.Module                  # what the loop calls forward on (may be a DDP/FSDP wrapper)
    optimizer: torch.optim.Optimizer
    precision: PrecisionTable

    def autocast(self) -> ContextManager: ...
    def no_sync(self, sync: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...
    def step(self, finite: bool) -> None: ...
    def save_state(self, folder: Path) -> None: ...
    def load_state(self, folder: Path) -> None: ...
    @property
    def loss_scale(self) -> float | None: ...


STRATEGIES = {"single": LocalEngine, "ddp": LocalEngine}


def resolve_strategy(name: str, world_size: int) -> str:
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def build_engine(parallel_cfg, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> Engine:
    name = resolve_strategy(parallel_cfg.strategy, dist.world_size)
    table = precision_table(parallel_cfg.precision)
    return STRATEGIES[name](model, optimizer, dist=dist, precision=table, parallel_cfg=parallel_cfg)
