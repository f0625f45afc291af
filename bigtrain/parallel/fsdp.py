"""`fsdp` strategy: PyTorch FSDP2 (`fully_shard` per block, then the root), optionally hybrid (HSDP).

The model arrives built on the meta device. In torchtitan's order: activation checkpointing →
compile → shard → `to_empty` → `init_weights`, so no rank ever holds the full model; init draws
only this rank's rows of each weight (generators seeded per block of rows), so the weights equal a
single-process run's. Mixed precision is FSDP's own (`MixedPrecisionPolicy`: parameters
all-gathered in the compute dtype, gradients reduce-scattered in fp32, sharded fp32 master weights),
so autocast is not needed. FSDP's reduce-scatter averages over ranks like DDP, so the loop's
loss contract (world_size / global targets) holds unchanged.

Checkpoints are sharded `torch.distributed.checkpoint` (DCP) folders: every rank writes its shard of
the model and optimizer state; loading reshards, so a run resumes on another world size.
`open_weights` reads one full tensor at a time without a process group (init_from, export).
DCP pickles its `.metadata` and loads saved objects with `weights_only=False`; bigtrain reads both
through an allowlist (`SafeReader`, `SafeLoadPlanner`), keeping the contract that nothing read from a file runs code (checkpoints load weights only).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
import contextlib
import hashlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from bigtrain.core import filehash

from bigtrain.core import safe_load
from bigtrain.parallel.ema import EMA, EMA_KEY
from bigtrain.core.errors import UserError
from bigtrain.parallel.dist import Dist, use_tf32
from bigtrain.parallel.full_tensors import load_full_tensors
from bigtrain.parallel.precision import PrecisionTable, freeze_in, hold_frozen_linears_in, make_grad_scaler
from bigtrain.parallel.steps import ScaledSteps
from bigtrain.parallel.transforms import apply_transforms, named_tensors

if TYPE_CHECKING:
    from bigtrain.models.transformer import Transformer

DCP_METADATA = ".metadata"  # written last by dcp.save; marks a DCP folder
MODEL_KEY, OPTIM_KEY = "model", "optim"  # top-level keys of the DCP state: "model.<state-dict name>"

class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata goes through bigtrain/core/safe_load.py (DCP's metadata types only, every storage
    path inside the checkpoint folder)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")  # DCP's per-rank metadata when saved without collectives (newer torch)
        path = self.fs.concat_path(self.path, DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}")
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_load.dcp_metadata(f.read(), folder=self.path, where=path)
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """Loads saved non-tensor objects (optimizer param groups) through bigtrain/core/safe_load.py (weights only);
    `folder`: the checkpoint, which a refusal names."""

    def __init__(self, folder=None, **kwargs):
        super().__init__(**kwargs)
        self.folder = folder

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        value = safe_load.torch_file(value, where=f"'{read_item.storage_index.fqn}' of DCP checkpoint {self.folder}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], value)
        else:
            self.state_dict[read_item.dest_index.fqn] = value


_SCATTER_ELEMENTS = 1 << 20  # init_from: each rank receives at most this many elements per scatter (4 MB fp32)


def _load_full_tensor(target: torch.Tensor, full: torch.Tensor | None, dist: Dist) -> None:
    """Copy `full` (given on rank 0 only) into `target`, a DTensor shard or a plain tensor (collective)."""
    local = target.to_local() if isinstance(target, DTensor) else target
    if not dist.distributed:
        assert full is not None  # the one rank is rank 0
        local.copy_(full)
        return
    rows, world = target.shape[0] if target.dim() else 0, dist.world_size
    if isinstance(target, DTensor) and target.device_mesh.ndim == 1 and target.placements[0] == Shard(0):
        chunk = -(-rows // world)  # torch.chunk's split, as fully_shard uses: rank r holds rows [r·chunk, …)
        source = None
        if dist.is_main:
            assert full is not None  # rank 0's
            source = full.to(device=local.device, dtype=local.dtype)  # no copy if it matches
        row_numel = max(1, target.numel() // max(rows, 1))
        per_piece = max(1, _SCATTER_ELEMENTS // row_numel)  # rows each rank receives per scatter
        for at in range(0, chunk, per_piece):
            n = min(per_piece, chunk - at)
            received = torch.empty((n, *target.shape[1:]), dtype=local.dtype, device=local.device)
            pieces = None
            if source is not None:  # rank 0: rank r's rows [r·chunk + at, +n), clipped at the end, padded to n
                pieces = [source[min(r * chunk + at, rows):min(r * chunk + at + n, rows)] for r in range(world)]
                pieces = [p if p.shape[0] == n else torch.cat([p, received.new_zeros((n - p.shape[0], *p.shape[1:]))])
                          for p in pieces]
            torch_dist.scatter(received, pieces, src=0)
            mine = max(0, min(n, local.shape[0] - at))
            local[at:at + mine].copy_(received[:mine])
        return
    if dist.is_main:
        assert full is not None  # rank 0's
        buffer = full.to(device=local.device, dtype=local.dtype).contiguous()
    else:
        buffer = torch.empty(target.shape, dtype=local.dtype, device=local.device)
    torch_dist.broadcast(buffer, src=0)
    if isinstance(target, DTensor):
        buffer = distribute_tensor(buffer, target.device_mesh, target.placements, src_data_rank=None).to_local()
    local.copy_(buffer)


class _HashingWriter(dcp.FileSystemWriter):
    """DCP's file writer for `folder`, hashing each shard (and .metadata) as it writes it (bigtrain/core/filehash.py),
    so the manifest needs no second read of the checkpoint; and each item on its own, so that each shard file's
    manifest entry also has a "weights" part: the digest of its `model.*` items (`_weights_digest`), which init_from
    checks without reading the optimizer state beside them. Its write_data runs where DCP writes (async_save: DCP's
    thread), and gives this rank's items, with where each landed."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.fs = filehash.hashing_filesystem(segments=True)

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        spans: dict[str, list[tuple[int, int]]] = {}  # shard file -> (offset, length) of each model item in it
        for result in future.wait():  # done: the files are written and closed
            where = result.storage_data
            if result.index.fqn.startswith(f"{MODEL_KEY}."):
                spans.setdefault(where.relative_path, []).append((where.offset, where.length))
        for name, items in spans.items():
            path = self.fs.concat_path(self.path, name)
            segments = filehash.segments(path)
            if all(span in segments for span in items):  # else no part: the whole file is verified, never a wrong one
                digest = _weights_digest(segments[span] for span in sorted(items))
                filehash.record_part(path, filehash.WEIGHTS_PART, digest)
        return future


def _weights_digest(item_digests) -> str:
    """A shard file's "weights" part: sha256 over its model items' sha256 digests, in the order of their offsets."""
    digest = hashlib.sha256()
    for item in item_digests:
        digest.update(item)
    return digest.hexdigest()


def weights_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """The "weights" part of each DCP shard file `names` of checkpoint `folder`, computed from the file: the bytes of
    the `model.*` items its .metadata (verified whole before: it says where they are) places in it, and nothing
    else of the file."""
    metadata = SafeReader(str(folder)).read_metadata()
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    for index, where in metadata.storage_data.items():
        if index.fqn.startswith(f"{MODEL_KEY}.") and where.relative_path in spans:
            spans[where.relative_path].append((where.offset, where.length))
    return {name: _weights_digest(filehash.range_digests(folder / name, sorted(spans[name]))) for name in names}


def build_mesh(dist: Dist, shard_group_size: int | None) -> DeviceMesh:
    """1-D mesh over all ranks (FSDP), or 2-D (replicate, shard) with shard groups of shard_group_size (HSDP)."""
    world = dist.world_size
    if not torch_dist.is_initialized():  # one process without torchrun: a 1-rank group for the mesh and DCP
        torch_dist.init_process_group("nccl" if dist.device.type == "cuda" else "gloo", store=torch_dist.HashStore(),
                                      rank=0, world_size=1)
    if shard_group_size is None or shard_group_size == world:
        return init_device_mesh(dist.device.type, (world,), mesh_dim_names=("shard",))
    if shard_group_size < 1 or world % shard_group_size:
        raise UserError(f"parallel.shard_group_size={shard_group_size} must divide the number of processes "
                        f"({world}) — pick a divisor, or leave it unset to shard over all ranks")
    return init_device_mesh(dist.device.type, (world // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


class FSDPEngine(ScaledSteps):
    """Forward/backward/step on a model whose parameters are sharded DTensors (FSDP2)."""

    builds_on_meta = True
    checkpoint_format = "dcp"
    ema: EMA | None = None  # over this rank's shards when optim.ema_decay is set (run.py attaches it)
    # a LoRA run's base tensors (run.py sets them; base.json names where they are)
    skip_saving: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module, make_optimizer, *, dist: Dist, precision: PrecisionTable, parallel_cfg):
        if parallel_cfg.offload_params == "nvme":
            raise UserError("parallel.offload_params=nvme needs parallel.strategy=deepspeed — use cpu with fsdp")
        self.dist = dist
        self.precision = precision
        self.parallel_cfg = parallel_cfg
        use_tf32(dist.device, parallel_cfg.tf32)
        model.to(precision.param)  # on meta: free; bf16-pure keeps the sharded weights themselves in bf16
        if precision.compute != precision.param:
            hold_frozen_linears_in(model, precision.compute)  # a LoRA base: sharded in the compute dtype
        apply_transforms(model, parallel_cfg)  # activation checkpointing, then compile, before sharding

        self.mesh = build_mesh(dist, parallel_cfg.shard_group_size)
        mp = (MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.grad_reduce)
              if precision.compute != precision.param else MixedPrecisionPolicy())
        self._shard(model, mp)
        self.module = self.model = model
        self.optimizer = make_optimizer(model)
        self.scaler = make_grad_scaler(precision, dist.device)

    def _shard(self, model: nn.Module, mp: MixedPrecisionPolicy) -> None:
        """fully_shard each block, then the root (embeddings, final norm and head), over this engine's mesh; then
        allocate this rank's shards (on the CPU with parallel.offload_params=cpu) and initialise them."""
        offload = self.parallel_cfg.offload_params == "cpu"
        offload_policy = CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda") if offload else OffloadPolicy()
        shard: dict[str, Any] = dict(mesh=self.mesh, mp_policy=mp, offload_policy=offload_policy)
        transformer = cast("Transformer", model)  # build_model's (the student, a teacher)
        for block in transformer.blocks:
            fully_shard(block, **shard)
        fully_shard(model, **shard)
        model.to_empty(device="cpu" if offload else self.dist.device)  # allocates this rank's shards only
        transformer.init_weights()
        if offload:  # buffers (rotary tables) are not offloaded: they live where the compute is
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    setattr(module, name, buffer.to(self.dist.device))

    def frozen(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """Another model (a distillation teacher, built on the meta device) frozen in the compute dtype with
        `weights`, sharded as this engine shards its own: each forward gathers a block at a time, and after it
        every parameter goes back to its shard (FSDP keeps the root gathered for a backward that never comes)."""
        freeze_in(model, self.precision.compute)
        self._shard(model, MixedPrecisionPolicy())  # already in the compute dtype
        self._load_full_tensors(model, weights)
        model.register_forward_hook(lambda module, args, output: module.reshard())
        return model

    # ---------------------------------------------------------------- step pieces

    def autocast(self):
        return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy casts parameters for the forward

    def no_sync(self, sync: bool):
        """Reduce-scatter every micro-batch, so gradients accumulate in the sharded fp32 gradient. With
        parallel.fsdp_no_sync, only at the last one (`sync`): until then each rank holds the unsharded
        gradient of every parameter (+4 bytes × parameters per rank)."""
        if self.parallel_cfg.fsdp_no_sync:
            cast(FSDPModule, self.model).set_requires_gradient_sync(sync)  # fully_shard made it one
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over every rank's shards, before clipping (inf/nan when non-finite), as a plain
        tensor; clips when max_norm > 0."""
        self.unscale_gradients()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # partial sums of the shards → the full norm, the same on every rank
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm

    # ---------------------------------------------------------------- checkpoints

    def load_model_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Full tensors by name → this rank's shards, one tensor at a time, read by rank 0 only (a lazy mapping
        reads each only then): a parameter sharded on dim 0 over all ranks (FSDP's layout) is scattered, each
        rank receiving just its rows; anything else (HSDP's 2-D layout, buffers) is broadcast whole. So the
        checkpoint is read once per job, and beside its shards a rank holds at most one tensor's rows (rank 0:
        the tensor it read, memory-mapped when the checkpoint is)."""
        self._load_full_tensors(self.module, weights)

    def _load_full_tensors(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        load_full_tensors(named_tensors(model), weights, _load_full_tensor, self.dist)

    def _state(self) -> dict:
        """What a DCP checkpoint holds: model and optimizer state (and the EMA's shards), by state-dict name."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        model_state = {name: t for name, t in model_state.items() if name not in self.skip_saving}
        state = {MODEL_KEY: model_state, OPTIM_KEY: optim_state}
        if self.ema:
            state[EMA_KEY] = self.ema.state_dict()
        return state

    def save_state(self, folder: Path) -> None:
        """Every rank writes its shards of model and optimizer state into `folder` (synchronous DCP save)."""
        dcp.save(self._state(), storage_writer=_HashingWriter(folder))
        if self.scaler and self.dist.is_main:
            filehash.save(self.scaler.state_dict(), folder / "scaler.pt")

    def save_state_async(self, folder: Path, group=None) -> Future:
        """DCP's async_save: this rank's shards are copied to host memory now, then written by DCP's thread,
        planned over `group` (a gloo group of its own, so its collectives never meet the training loop's)."""
        future = dcp.async_save(self._state(), storage_writer=_HashingWriter(folder), process_group=group)
        if self.scaler and self.dist.is_main:
            filehash.save(self.scaler.state_dict(), folder / "scaler.pt")
        return future  # type: ignore[return-value]  # a Future without an async_stager; torch's hint says either

    def load_state(self, folder: Path) -> None:
        """Load model + optimizer state resharded onto this world size (DCP plans the reads)."""
        if not (folder / DCP_METADATA).is_file():
            raise UserError(f"checkpoint {folder} was not written by parallel.strategy=fsdp — resume it with the "
                            f"strategy that wrote it, or start from its weights with model.init_from")
        metadata = SafeReader(str(folder)).read_metadata()  # a bad one: the same one-line error on every rank
        state = self._state()
        saved_ema = any(key.startswith(f"{EMA_KEY}.") for key in metadata.state_dict_metadata)
        if EMA_KEY in state and not saved_ema:
            del state[EMA_KEY]
        dcp.load(state, storage_reader=_ReadMetadata(str(folder), metadata), planner=SafeLoadPlanner(folder))
        set_state_dict(self.module, self.optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIM_KEY], options=StateDictOptions(strict=not self.skip_saving))
        if self.ema:  # loaded in place into the EMA's own shards, or (saved without EMA) started here
            self.ema.load_state_dict(state[EMA_KEY]) if saved_ema else self.ema.restart_from_weights()
        if self.scaler and (folder / "scaler.pt").exists():
            self.scaler.load_state_dict(safe_load.torch_file(folder / "scaler.pt"))


    def close(self) -> None:
        """Nothing of its own to release (DeepSpeed's engine has)."""

class DCPWeights:
    """The model tensors of a DCP checkpoint: names, dtypes and shapes from its metadata; one full
    tensor assembled from the shard files when asked for (no process group needed)."""

    def __init__(self, folder: Path, key: str = MODEL_KEY):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder, self.key = folder, key
        self._metadata = metadata = SafeReader(str(folder)).read_metadata()  # unpickled once; each get() reuses it
        prefix = f"{key}."
        self._tensors = {key[len(prefix):]: (meta.properties.dtype, tuple(meta.size))
                         for key, meta in metadata.state_dict_metadata.items()
                         if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        if not self._tensors and key == EMA_KEY:
            raise UserError(f"checkpoint {folder} has no EMA weights — train with optim.ema_decay to keep them")

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return dict(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape = self._tensors[name]
        out = torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({f"{self.key}.{name}": out}, storage_reader=_ReadMetadata(str(self.folder), self._metadata),
                     planner=SafeLoadPlanner(self.folder), no_dist=True)
        return out


class _ReadMetadata(SafeReader):
    """A reader of a DCP folder whose .metadata was read already (DCPWeights: one unpickle per folder, not per
    tensor; a resume: one per rank, not one more inside dcp.load — the metadata of a 70B model is tens of MB)."""

    def __init__(self, path: str, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        self._metadata.storage_meta.load_id = self.load_id  # as SafeReader's: this load's id
        return self._metadata


def holds_weights(name: str) -> bool:
    """DCPWeights reads .metadata and the shard files (each rank's holds its model and optimizer shards together)."""
    return name.endswith(DCP_METADATA) or name.endswith(".distcp")


def open_weights(folder: Path, ema: bool = False) -> DCPWeights:
    return DCPWeights(folder, EMA_KEY if ema else MODEL_KEY)
