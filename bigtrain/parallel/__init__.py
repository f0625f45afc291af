"""Parallelism strategies behind one Protocol: wrap a finished model, build its optimizer, give an Engine.

`parallel.strategy` picks the implementation from `STRATEGIES` (short names, never import paths).
`auto` means ddp when several processes were started, else single. Each strategy module is
imported only when chosen, so `deepspeed` loads only in `parallel/deepspeed.py`.

A checkpoint's tensors are in the format of the strategy that wrote it (`Engine.checkpoint_format`,
recorded in trainer.json). `open_format_weights(folder)` reads the tensors of any format without a
process group, one tensor at a time (checkpoint/weights.py's `open_weights` adds a LoRA run's base).
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Protocol

import torch
from torch import nn

from bigtrain.core import safe_load
from bigtrain.parallel.dist import (Dist, all_reduce_host, all_reduce_sum, barrier, broadcast_object, init_distributed,
                                   shutdown)
from bigtrain.parallel.precision import PrecisionTable, precision_table, resolve_job_precision

if TYPE_CHECKING:
    from bigtrain.config import ParallelConfig
    from bigtrain.parallel.ema import EMA

__all__ = [
    "Dist", "Engine", "PrecisionTable", "STRATEGIES", "WeightsReader", "all_reduce_host", "all_reduce_sum", "barrier",
    "broadcast_object", "build_engine", "engine_class", "holds_weights", "init_distributed", "launcher_precision",
    "open_format_weights", "precision_table", "resolve_strategy", "shutdown", "weights_digests",
]

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


class Engine(Protocol):
    dist: Dist
    module: nn.Module                 # the bare model (possibly sharded): FLOPs, eval forward
    model: nn.Module                  # what the loop calls forward on (may be a DDP/FSDP/DeepSpeed wrapper)
    optimizer: torch.optim.Optimizer
    precision: PrecisionTable
    builds_on_meta: bool              # class attribute: run.py builds the model on the meta device
    ema: EMA | None                   # optim.ema_decay's average (run.py attaches it; saved and loaded with the state)
    checkpoint_format: str            # class attribute: key of READERS for its checkpoints
    skip_saving: frozenset            # state-dict names its checkpoints leave out (a LoRA run's base, base.json)

    def __init__(self, model: nn.Module, make_optimizer: MakeOptimizer, *, dist: Dist, precision: PrecisionTable,
                 parallel_cfg: ParallelConfig, **extra: object) -> None: ...  # extra: `recipe` (needs_recipe)
    def autocast(self) -> ContextManager: ...
    def no_sync(self, sync: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor: ...
    def step(self, finite: bool | torch.Tensor) -> None: ...  # a device flag: skipped without a host read where it can be
    def load_model_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...  # full tensors by name, read lazily (init_from)
    def frozen(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module: ...  # a teacher, laid out as the model
    def save_state(self, folder: Path) -> None: ...  # collective: every rank calls it
    # Optional, `save_state_async(folder, group) -> Future` (single, ddp, fsdp; DeepSpeed saves synchronously):
    # copies the state to host memory on the calling thread; the Future is done once this rank's files are written.
    def load_state(self, folder: Path) -> None: ...  # collective; works for a checkpoint of another world size
    def close(self) -> None: ...  # release the engine's own threads and hooks (before the process group goes)
    def step_loss_scale(self) -> torch.Tensor | float | None: ...  # the scale this step's backward used, unread (fp16)
    @property
    def loss_scale(self) -> float | None: ...  # read on the host (log steps)


class WeightsReader(Protocol):
    """Model weights of one checkpoint, read lazily: metadata first, then one tensor at a time."""

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]: ...  # name -> (dtype, shape)
    def get(self, name: str) -> torch.Tensor: ...  # the full (unsharded) tensor on the CPU


# Strategy name -> module under bigtrain.parallel and its Engine class (imported on first use).
STRATEGIES: dict[str, tuple[str, str]] = {
    "single": ("local", "LocalEngine"),
    "ddp": ("local", "LocalEngine"),
    "fsdp": ("fsdp", "FSDPEngine"),
    "deepspeed": ("deepspeed", "DeepSpeedEngine"),
}

# checkpoint_format -> module under bigtrain.parallel with `open_weights(folder) -> WeightsReader`.
READERS: dict[str, str] = {"local": "local", "dcp": "fsdp", "deepspeed": "deepspeed_checkpoint"}


def resolve_strategy(name: str, world_size: int) -> str:
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def engine_class(parallel_cfg, world_size: int) -> type[Engine]:
    module, cls = STRATEGIES[resolve_strategy(parallel_cfg.strategy, world_size)]
    return getattr(importlib.import_module(f"bigtrain.parallel.{module}"), cls)


def building(recipe, dist: Dist):
    """The context to build the model in: an engine's own (`building(recipe, dist)`, e.g. ZeRO-3 partitioning
    each module as it is made) or none."""
    cls = engine_class(recipe.parallel, dist.world_size)
    return cls.building(recipe, dist) if hasattr(cls, "building") else contextlib.nullcontext()


def build_engine(parallel_cfg, model: nn.Module, make_optimizer: MakeOptimizer, dist: Dist, recipe=None) -> Engine:
    """Wrap a finished model (transforms → shard → init), then build its optimizer over the wrapped params.

    `recipe` (the whole Config) goes to engines that declare `needs_recipe` (DeepSpeed's own config repeats
    the batch sizes, accumulation and clipping)."""
    name = resolve_strategy(parallel_cfg.strategy, dist.world_size)
    precision = parallel_cfg.precision
    if precision == "auto":  # run.py resolves it first; direct callers get the same rule
        precision = resolve_job_precision(dist, precision, launcher_choice=launcher_precision(parallel_cfg)).name
    table = precision_table(precision, name)
    cls = engine_class(parallel_cfg, dist.world_size)
    extra = {"recipe": recipe} if getattr(cls, "needs_recipe", False) else {}
    return cls(model, make_optimizer, dist=dist, precision=table, parallel_cfg=parallel_cfg, **extra)


def launcher_precision(parallel_cfg) -> str | None:
    """The precision a launcher's own config asks for, which `auto` takes: a `parallel.deepspeed_config` with
    bf16 or fp16 enabled (accelerate's --mixed_precision arrives as an override before this)."""
    if parallel_cfg.strategy != "deepspeed" or not parallel_cfg.deepspeed_config:
        return None
    from bigtrain.parallel.deepspeed_config import config_precision  # imports no deepspeed

    return config_precision(parallel_cfg.deepspeed_config)


def checkpoint_format(folder: Path) -> str:
    trainer = Path(folder) / "trainer.json"
    return safe_load.read_json(trainer).get("format", "local") if trainer.is_file() else "local"


def open_format_weights(folder: Path, ema: bool = False) -> WeightsReader:
    """A reader of the tensors checkpoint `folder` holds itself, in the format of the strategy that wrote it (`ema`:
    its EMA weights). A LoRA run's checkpoint holds only what it trained: checkpoint/weights.py's `open_weights`
    puts its base back."""
    fmt = checkpoint_format(folder)
    return importlib.import_module(f"bigtrain.parallel.{READERS[fmt]}").open_weights(Path(folder), ema=ema)


def holds_weights(name: str) -> bool:
    """Whether checkpoint file `name` (relative to its folder) is one that `open_weights(folder)` reads, in whichever
    format (their file names differ): what init_from verifies, leaving out optimizer state, rng and EMA files."""
    return any(importlib.import_module(f"bigtrain.parallel.{module}").holds_weights(name)
               for module in sorted(set(READERS.values())))


def weights_digests(folder: Path, names: list[str]) -> dict[str, str | None]:
    """The "weights" part of each checkpoint file `names` (its manifest entry's `parts`, recorded at save), computed
    from the file by the format that wrote `folder`, reading only the model weights in it: init_from's check of a
    shard that also holds optimizer state. None for a file that has no such part in that format."""
    if not names:
        return {}
    module = importlib.import_module(f"bigtrain.parallel.{READERS[checkpoint_format(folder)]}")
    return module.weights_digests(Path(folder), names)


def iter_weights(reader: WeightsReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.tensors():
        yield name, reader.get(name)
