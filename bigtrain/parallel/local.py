"""`single` and `ddp` strategies: the model lives whole on each rank; DDP all-reduces gradients.

Checkpoint tensors are written by rank 0 as plain `torch.save` files (model.pt, optimizer.pt,
scaler.pt) and read back with `weights_only=True` by rank 0, which broadcasts them to the other
replicas (a checkpoint is read once per job), so a run saved on N ranks resumes on any other number of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
import contextlib
import copy
from dataclasses import dataclass
import inspect
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigtrain.core import filehash

from bigtrain.core import safe_load
from bigtrain.parallel.ema import EMA, EMA_FILE
from bigtrain.core.errors import UserError
from bigtrain.parallel.dist import Dist, broadcast_object, use_tf32
from bigtrain.parallel.full_tensors import load_full_tensors, write_whole
from bigtrain.parallel.precision import PrecisionTable, autocast, freeze_in, hold_frozen_linears_in, make_grad_scaler
from bigtrain.parallel.steps import ScaledSteps
from bigtrain.parallel.transforms import apply_transforms


def _no_forward_buffer_sync() -> dict[str, Any]:
    """DDP's broadcast_buffers=False under the name this torch uses (newer ones warn on the old name)."""
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if new_name else "broadcast_buffers": False}


class LocalEngine(ScaledSteps):
    """Forward/backward/step for one full model replica per rank (single process or DDP)."""

    builds_on_meta = False
    checkpoint_format = "local"
    ema: EMA | None = None  # when optim.ema_decay is set (run.py attaches it)
    # a LoRA run's base tensors (run.py sets them; base.json names where they are)
    skip_saving: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module, make_optimizer, *, dist: Dist, precision: PrecisionTable, parallel_cfg):
        self.dist = dist
        self.precision = precision
        use_tf32(dist.device, parallel_cfg.tf32)
        self.module = model  # the bare model: state dicts, FLOPs, eval
        model.to(precision.param)  # bf16-pure keeps the weights themselves in bf16
        if precision.compute != precision.param:
            hold_frozen_linears_in(model, precision.compute)  # a LoRA base: no fp32 copy
        self.optimizer = make_optimizer(model)
        self.scaler = make_grad_scaler(precision, dist.device)
        apply_transforms(model, parallel_cfg)
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            # Buffers (the RoPE tables) are computed identically on every rank: no broadcast before each forward.
            # Gradients are views into DDP's buckets: no copy in or out of them, one gradient-sized buffer less.
            self.model: nn.Module = DistributedDataParallel(model, device_ids=device_ids,
                                                            gradient_as_bucket_view=True, **_no_forward_buffer_sync())
        else:
            self.model = model

    # ---------------------------------------------------------------- step pieces

    def autocast(self):
        return autocast(self.precision, self.dist.device)

    def no_sync(self, sync: bool):
        """Skip the gradient all-reduce unless `sync` (the last micro-batch of the step)."""
        if sync or not self.dist.distributed:
            return contextlib.nullcontext()
        return cast(DistributedDataParallel, self.model).no_sync()  # distributed: the DDP wrapper

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping (inf/nan when non-finite); clips when max_norm > 0."""
        self.unscale_gradients()
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit, foreach=True)

    # ---------------------------------------------------------------- checkpoints

    def load_model_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Full tensors by name, copied one at a time (a lazy mapping reads each only then), read by rank 0 and
        broadcast to the other replicas: the checkpoint is read once per job, not once per rank."""
        copy_weights(self.module, weights, self.dist)

    def frozen(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """Another model (a distillation teacher, built on this device) frozen in the compute dtype with
        `weights`, whole on every rank like this engine's own."""
        freeze_in(model, self.precision.compute)
        copy_weights(model, weights, self.dist)
        return model

    def _state_files(self) -> dict[str, dict]:
        """file name -> the state dict it holds (rank 0 writes them all)."""
        model = {name: t for name, t in self.module.state_dict().items() if name not in self.skip_saving}
        files = {"model.pt": model, "optimizer.pt": self.optimizer.state_dict()}
        if self.scaler:
            files["scaler.pt"] = self.scaler.state_dict()
        if self.ema:
            files[EMA_FILE] = self.ema.state_dict()
        return files

    def save_state(self, folder: Path) -> None:
        if self.dist.is_main:
            for name, state in self._state_files().items():
                filehash.save(state, folder / name)

    def save_state_async(self, folder: Path, group=None) -> Future:
        """Copy the state to host memory now (the only part the training thread waits for), write it from a
        background thread; the Future is done when this rank's files are written."""
        if not self.dist.is_main:
            return _done()
        staged = copy_to_host(self._state_files())

        def write() -> None:
            for name, state in staged.items():
                filehash.save(state, folder / name)

        return in_background(write)

    def load_state(self, folder: Path) -> None:
        """Model, optimizer (and scaler, EMA) state, read by rank 0 and broadcast to the other replicas
        (`load_on_main`): each rank reads nothing of the checkpoint beyond its share of the verification."""
        load_leaving_out(self.module, load_on_main(folder / "model.pt", self.dist), self.skip_saving)
        self.optimizer.load_state_dict(load_on_main(folder / "optimizer.pt", self.dist))
        if self.scaler and (folder / "scaler.pt").exists():
            self.scaler.load_state_dict(safe_load.torch_file(folder / "scaler.pt"))
        if self.ema and (folder / EMA_FILE).is_file():
            self.ema.load_state_dict(load_on_main(folder / EMA_FILE, self.dist))
        elif self.ema:
            self.ema.restart_from_weights()  # saved without EMA: the average starts here

    def close(self) -> None:
        """Nothing of its own to release (DeepSpeed's engine has)."""


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor's place in a state's structure, as `load_on_main` sends it ahead of the tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def load_on_main(path: Path, dist: Dist):
    """torch.load(path) (weights only, onto this rank's device), read by rank 0 alone (collective): the structure
    goes to the other ranks as an object with each tensor's shape and dtype in its place, then each tensor by a
    broadcast. So ddp's replicas resume from one read of the checkpoint, not one per rank."""
    state = safe_load.torch_file(path, map_location=dist.device) if dist.is_main else None
    if not dist.distributed:
        return state
    structure = broadcast_object(dist, _structure(state) if dist.is_main else None)
    return _filled(structure, state, dist)


def _structure(obj):
    """`obj` (nested dicts, lists, tuples) with each tensor replaced by its _TensorSpec."""
    if isinstance(obj, torch.Tensor):
        return _TensorSpec(tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):  # an OrderedDict keeps its type and its `_metadata` (module versions)
        out = type(obj)((k, _structure(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            setattr(out, "_metadata", copy.deepcopy(obj._metadata))  # not a dict attribute: torch sets it
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_structure(v) for v in obj)
    return obj


def _filled(structure, state, dist: Dist):
    """`structure` with each _TensorSpec replaced by rank 0's tensor (`state`, None on the other ranks), broadcast
    in the structure's order (the same on every rank)."""
    if isinstance(structure, _TensorSpec):
        tensor = state.contiguous() if dist.is_main else torch.empty(structure.shape, dtype=structure.dtype,
                                                                     device=dist.device)
        torch_dist.broadcast(tensor, src=0)
        return tensor
    if isinstance(structure, dict):
        out = type(structure)((k, _filled(v, state[k] if dist.is_main else None, dist)) for k, v in structure.items())
        if hasattr(structure, "_metadata"):
            setattr(out, "_metadata", structure._metadata)  # not a dict attribute: torch sets it
        return out
    if isinstance(structure, (list, tuple)):
        return type(structure)(_filled(v, state[i] if dist.is_main else None, dist) for i, v in enumerate(structure))
    return structure


def load_leaving_out(model: nn.Module, state: dict, left_out: frozenset) -> None:
    """load_state_dict, strict but for the `left_out` names a checkpoint may lack (they are loaded already)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in left_out]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint model state: missing {missing[:4]}, unexpected {unexpected[:4]}")


def copy_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], dist: Dist) -> None:
    """Full tensors by state-dict name into `model`, one at a time (a lazy mapping reads each only then): rank 0
    reads each and broadcasts it into the other ranks' replicas (collective; parallel/full_tensors.py)."""
    load_full_tensors(model.state_dict(keep_vars=True), weights, write_whole, dist)


def copy_to_host(obj, _memo: dict | None = None):
    """A copy of a nested state dict (dicts, lists, tuples) with every tensor's storage copied into CPU memory.
    What is shared stays shared, as in copy.deepcopy (tensors of one storage, like tied weights; the optimizer's
    param groups' tuples), so torch.save writes the same file as from the original."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    out: object
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in memo:
            memo[key] = torch.UntypedStorage(storage.nbytes(), device="cpu")
            memo[key].copy_(storage)
        out = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
    elif isinstance(obj, dict):  # an OrderedDict keeps its type and its `_metadata` (module versions)
        out = type(obj)((k, copy_to_host(v, memo)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            setattr(out, "_metadata", copy.deepcopy(obj._metadata))  # not a dict attribute: torch sets it
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(copy_to_host(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def in_background(work) -> Future:
    """Run `work()` on a thread of its own; the Future holds its result or exception."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigtrain-save")
    future = pool.submit(work)
    pool.shutdown(wait=False)  # the thread ends when the work does
    return future


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future


class LocalWeights:
    """model.pt (or ema.pt) of a single/ddp checkpoint, memory-mapped: a tensor is read when asked for."""

    def __init__(self, folder: Path, file: str = "model.pt"):
        if file == EMA_FILE and not (folder / file).is_file():
            raise UserError(f"checkpoint {folder} has no EMA weights — train with optim.ema_decay to keep them")
        self._state = safe_load.torch_file(folder / file, mmap=True)

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def holds_weights(name: str) -> bool:
    """model.pt is what LocalWeights reads (optimizer.pt, scaler.pt and ema.pt are not)."""
    return name == "model.pt"


def weights_digests(folder: Path, names: list[str]) -> dict[str, None]:
    """No part of a single/ddp file holds the weights alone: model.pt is the weights, verified whole."""
    return {name: None for name in names}


def open_weights(folder: Path, ema: bool = False) -> LocalWeights:
    return LocalWeights(folder, EMA_FILE if ema else "model.pt")
