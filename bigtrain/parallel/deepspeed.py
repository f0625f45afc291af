"""`deepspeed` strategy: ZeRO stage 1/2/3 (optionally offloaded) behind the Engine Protocol.

The DeepSpeed config is generated from the recipe (bigtrain/parallel/deepspeed_config.py). bigtrain keeps the
optimizer (our AdamW, or DeepSpeedCPUAdam when the optimizer is offloaded, as DeepSpeed requires) and the LR
schedule (the loop sets each group's lr on `engine.optimizer`, the optimizer DeepSpeed steps).

Gradient contract: the loop scales each micro-batch loss by world_size / global targets and
DeepSpeed averages over data-parallel ranks, so backward runs with `scale_wrt_gas=False` (no extra
division by the accumulation steps). DeepSpeed clips and detects non-finite gradients inside its
own step (all ranks agree), so `clip_grad_norm` runs that step and returns the norm it measured
before clipping (inf when it skipped the update); `step(finite)` checks that DeepSpeed's decision is
the loop's. Skipping a non-finite step at every ZeRO stage in fp32 and bf16 needs deepspeed>=0.19.8
(earlier versions check only fp16 at some stages and apply a NaN update); an applied non-finite step
stops the run rather than train on NaN weights.

Checkpoints are DeepSpeed's own files (`save_checkpoint` under tag `deepspeed`), every rank writing into the folder
bigtrain/checkpoint/store.py prepared; parallel/deepspeed_checkpoint.py holds their layout, the trust boundary
around DeepSpeed's reads, the conversion for another world size and the weights reader. A LoRA run's checkpoints
leave its frozen base parameters out (`exclude_frozen_parameters`; base.json names the base).
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as torch_dist
from torch import nn

from bigtrain.core import filehash
from bigtrain.core.errors import UserError
from bigtrain.parallel.deepspeed_checkpoint import (EMA_LAYOUT, EMA_RANK_FILE, LATEST, LAYOUT, TAG, _WRAPPED,
                                                  _deepspeed_reads, _hashing_saves, _remove_stale_conversions,
                                                  import_deepspeed, load_ema_partition, resumable_layout,
                                                  universal_copy)
from bigtrain.parallel.deepspeed_config import build_deepspeed_config
from bigtrain.parallel.dist import Dist, barrier, use_tf32
from bigtrain.parallel.full_tensors import load_full_tensors, write_whole
from bigtrain.parallel.precision import PrecisionTable, freeze_in
from bigtrain.parallel.transforms import apply_transforms, named_tensors

if TYPE_CHECKING:
    from bigtrain.models.layers import ZeroParameter
    from bigtrain.parallel.ema import EMA

# --------------------------------------------------------------------------- engine


def _partitioning_init(deepspeed):
    """deepspeed.zero.Init without its broadcast of each new parameter from rank 0.

    zero.Init sends every parameter whole from rank 0 before partitioning it, so that ranks which drew
    different random values agree. bigtrain's models draw nothing in their constructors (build_model skips
    torch's default init) and init_weights writes each rank's partition from the same per-row seeds right
    after, so the broadcast would ship uninitialised memory, and receiving it makes every rank touch the whole
    tensor: the largest one (embedding or head) then sets the build's peak. Partitioning directly copies only
    this rank's rows. `_zero_init_param` is DeepSpeed's per-parameter hook (broadcast, then partition) in the
    versions we allow; should it go, the plain Init is used, which is correct, only heavier."""
    init: Any = deepspeed.zero.Init  # a class (deepspeed ships no types): subclassed below
    if not callable(getattr(init, "_zero_init_param", None)):
        return init

    class PartitioningInit(init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitioningInit


def _ensure_process_group(dist: Dist) -> None:
    """DeepSpeed runs on a torch.distributed group: a one-process group when started alone."""
    if not torch_dist.is_initialized():
        backend = "nccl" if dist.device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    for key, value in (("RANK", dist.rank), ("LOCAL_RANK", dist.local_rank), ("WORLD_SIZE", dist.world_size)):
        os.environ.setdefault(key, str(value))  # DeepSpeed reads these (torchrun sets them already)


def _fetch_outside_selective_checkpointing(offload) -> None:
    """Run ZeRO-3's parameter gathering and releasing (its module hooks) outside selective checkpointing's dispatch
    mode. That mode records every op of a block's forward and requires its recomputation in backward to issue the
    same ops in the same order; the hooks' gathering is not the same twice (a parameter prefetched, or still
    gathered, needs no ops), so the recomputation stopped ("aten.slice.Tensor invocation index 5 encountered
    during backward but not found in storage"). Outside the mode, the hooks fetch what each pass needs, as they do
    under full checkpointing, and the mode sees only the model's own ops."""
    from torch.utils._python_dispatch import _disable_current_modes

    def outside(hook):
        def run(sub_module):
            with _disable_current_modes():
                return hook(sub_module)
        return run

    for name in ("pre_sub_module_forward_function", "post_sub_module_forward_function",
                 "pre_sub_module_backward_function", "post_sub_module_backward_function"):
        setattr(offload, name, outside(getattr(offload, name)))  # the hooks look them up on the instance


class DeepSpeedEngine:
    """A model wrapped by deepspeed.initialize with ZeRO `parallel.zero_stage`."""

    builds_on_meta = False  # DeepSpeed partitions a model built on the real device
    needs_recipe = True  # its config repeats batch sizes, accumulation and clipping
    checkpoint_format = "deepspeed"
    ema: EMA | None = None  # over ema_sources() when optim.ema_decay is set (run.py attaches it)
    # a LoRA run's base tensors (run.py sets them; base.json names where they are)
    skip_saving: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module, make_optimizer, *, dist: Dist, precision: PrecisionTable, parallel_cfg,
                 recipe):
        deepspeed = import_deepspeed()
        from deepspeed.utils import logger as ds_logger

        if precision.name == "bf16-pure":
            raise UserError("parallel.precision=bf16-pure is not available with parallel.strategy=deepspeed "
                            "(DeepSpeed always keeps fp32 master weights) — use parallel.precision=bf16")
        if precision.name == "bf16" and parallel_cfg.zero_stage == 1 and parallel_cfg.offload_optimizer != "cpu":
            # fp32 gradient accumulation at ZeRO-1 (not offloaded) makes DeepSpeed swap in its BF16_Optimizer,
            # whose checkpoints zero_to_fp32 (export, init_from) cannot read; without it, bf16 accumulation.
            raise UserError("parallel.precision=bf16 with parallel.zero_stage=1 is not available with "
                            "parallel.strategy=deepspeed (it would accumulate gradients in bf16) — use "
                            "parallel.zero_stage=2 (it also resumes ZeRO-1 checkpoints)")
        if precision.name == "fp16" and dist.device.type == "cpu":  # DeepSpeed's CPU accelerator: a traceback
            raise UserError("parallel.precision=fp16 is not available with parallel.strategy=deepspeed on the CPU "
                            "(DeepSpeed's CPU accelerator has no fp16) — use parallel.precision=bf16 or fp32")
        ds_logger.setLevel(logging.WARNING)
        self.dist = dist
        self.precision = precision
        self.parallel_cfg = parallel_cfg
        use_tf32(dist.device, parallel_cfg.tf32)
        _ensure_process_group(dist)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())
        config = build_deepspeed_config(recipe, dist.world_size, n_params)
        apply_transforms(model, parallel_cfg)
        optimizer = make_optimizer(model)
        if parallel_cfg.offload_optimizer != "none":
            optimizer = _cpu_adam(optimizer)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                dist_init_required=False)
        if self.ds.zero_optimization_partition_weights() and parallel_cfg.activation_checkpointing == "selective":
            _fetch_outside_selective_checkpointing(self.ds.optimizer.parameter_offload)
        self._config = config
        self._built_at = time.time()  # universal copies older than this are an earlier start's (load_state)
        self._frozen: list[Any] = []  # DeepSpeed engines of frozen models (frozen(), ZeRO-3): destroyed with this one
        self.module = model  # the bare model (ZeRO-3: its parameters are partitioned)
        self.model = self.ds  # forward through the DeepSpeed engine (ZeRO-3 gathers parameters)
        self.optimizer = self.ds.basic_optimizer  # the optimizer DeepSpeed steps: its groups carry the lr
        # Group hyperparameters come from the recipe, not the checkpoint (ZeRO-3's universal load copies
        # group 0's weight decay onto every group): restored after each load.
        self._group_settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self._scale_before_step: float | None = None

    @staticmethod
    def building(recipe, dist: Dist):
        """ZeRO-3: the context run.py builds the model in. deepspeed.zero.Init partitions each module's
        parameters as soon as the module is made, and init_weights then writes only this rank's slice
        (models/layers.write_rows_), so no rank ever holds the whole model. Other stages build it whole."""
        if recipe.parallel.zero_stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed()
        _ensure_process_group(dist)
        # DeepSpeed's comm layer over the existing group (deepspeed.initialize does this later; Init needs it now)
        deepspeed.init_distributed(dist_backend=torch_dist.get_backend(), dist_init_required=False)
        return _partitioning_init(deepspeed)(config_dict_or_path=build_deepspeed_config(recipe, dist.world_size))

    # ---------------------------------------------------------------- step pieces

    def autocast(self):
        # DeepSpeed casts the module to the compute dtype (bf16/fp16 sections): no autocast on top.
        return contextlib.nullcontext()

    def no_sync(self, sync: bool):
        """Mark whether this micro-batch ends the step: DeepSpeed reduces gradients at the boundary."""
        self.ds.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the step's global target count: no division by accumulation steps.
        self.ds.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Run DeepSpeed's step (clip at optim.grad_clip, update, or skip on every rank when non-finite) and
        return the global gradient norm it measured before clipping (inf for a skipped step)."""
        if float(max_norm) != self.ds.gradient_clipping():  # internal: the config was built from the same recipe
            raise ValueError(f"clip at {max_norm} but DeepSpeed's gradient_clipping is {self.ds.gradient_clipping()}")
        self._scale_before_step = self._current_loss_scale()
        self.ds.step()
        norm = self.ds.get_global_grad_norm() if self.ds.was_step_applied() else float("inf")
        if isinstance(norm, torch.Tensor):  # ZeRO-3 keeps it on the device: no read here (the loop's records do)
            return norm.detach().float()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def step(self, finite: bool | torch.Tensor) -> None:
        """DeepSpeed already applied (finite) or skipped (non-finite) the update in clip_grad_norm; the loop
        decided the same from the all-reduced loss and that norm, or the weights now hold NaN. (DeepSpeed's step
        reads its overflow flag and the norm on the host itself; this check reads `finite` after it.)"""
        self._scale_before_step = None
        if self.ds.was_step_applied() and not bool(finite):
            import deepspeed

            raise RuntimeError(f"DeepSpeed {deepspeed.__version__} applied a non-finite optimizer step (it does not "
                               f"skip them for this precision / ZeRO stage) — use deepspeed>=0.19.8")
        if self.ema:
            self.ema.update(finite)

    def ema_sources(self) -> dict[str, torch.Tensor]:
        """What the EMA averages, by state-dict name: the parameters (ZeRO-1/2 hold them whole, in the compute
        dtype) or, under ZeRO-3, this rank's partition of each (`ds_tensor`: flat, padded to an equal share)."""
        if self.parallel_cfg.offload_params != "none":
            raise UserError("optim.ema_decay is not available with parallel.offload_params under deepspeed (the "
                            "partitions it averages live on disk or move) — drop one of them")
        stage3 = self.ds.zero_optimization_partition_weights()
        named = {}
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if param.requires_grad:
                named[name.replace(_WRAPPED, "")] = cast("ZeroParameter", param).ds_tensor if stage3 else param
        return named

    def release_gathered(self) -> None:
        """ZeRO-3 keeps parameters gathered whole between uses (the small ones under
        stage3_param_persistence_threshold always, others while they will be reused soon), so partitions changed
        outside DeepSpeed's step (the EMA swapped in for eval, and back) reach the forward only once those are
        released and the small ones gathered again, as DeepSpeed's own step does around its update."""
        if self.ds.zero_optimization_partition_weights():
            self.ds.empty_partition_cache()  # every parameter released (the small ones too)
            persistent = self.ds.optimizer.persistent_parameters
            if persistent:
                persistent[0].all_gather(persistent)

    def _current_loss_scale(self) -> float | None:
        if not self.precision.loss_scaling:
            return None
        return float(self.ds.optimizer.loss_scale)

    def step_loss_scale(self) -> float | None:
        """The scale the step in clip_grad_norm started with (DeepSpeed keeps it on the host)."""
        return self.loss_scale

    @property
    def loss_scale(self) -> float | None:
        return self._scale_before_step if self._scale_before_step is not None else self._current_loss_scale()

    def close(self) -> None:
        """Release DeepSpeed's hooks, partitions and helper state while the process group still exists
        (left to interpreter teardown, a rank once aborted at exit: "terminate called without an active
        exception")."""
        import gc

        for frozen in self._frozen:
            frozen.destroy()
        self.ds.destroy()
        gc.collect()

    # ---------------------------------------------------------------- checkpoints

    def load_model_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Full tensors by state_dict name (init_from), one at a time (with ZeRO-3 only rank 0 reads them);
        refreshes DeepSpeed's fp32 master copies."""
        self._write_full(self.module, weights)
        self.ds.optimizer.refresh_fp32_params()

    def _write_full(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        load_full_tensors(named_tensors(model), weights, self._write_full_tensor, self.dist)

    def _write_full_tensor(self, tensor: torch.Tensor, full: torch.Tensor | None, dist: Dist) -> None:
        """ZeRO-3's partitioned parameter: gathered, written by rank 0, re-partitioned from rank 0's copy. A tensor
        every rank holds whole (ZeRO-1/2, buffers): rank 0's broadcast. Either way only rank 0 reads the checkpoint."""
        import deepspeed

        if not (self.ds.zero_optimization_partition_weights() and isinstance(tensor, nn.Parameter)):
            write_whole(tensor, full, dist)
            return
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if dist.is_main:
                assert full is not None  # rank 0's
                tensor.data.copy_(full)

    def frozen(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """Another model (a distillation teacher) frozen in the compute dtype with `weights`, laid out as this
        engine lays out its own: whole on every rank under ZeRO-1/2 (they partition optimizer state and gradients,
        which a frozen model has none of); under ZeRO-3 partitioned (run.py builds it in `building`, as the
        student) and run by a DeepSpeed engine without an optimizer, which gathers each module's parameters for
        its forward and releases them after."""
        if not self.ds.zero_optimization_partition_weights():
            freeze_in(model, self.precision.compute)
            self._write_full(model, weights)
            return model
        import deepspeed

        model.requires_grad_(False).eval()
        self._write_full(model, weights)
        config = {**self._config, "zero_optimization": {
            k: v for k, v in self._config["zero_optimization"].items() if k != "offload_optimizer"}}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
        engine.eval()
        self._frozen.append(engine)
        return engine

    def save_state(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        with contextlib.redirect_stdout(sys.stderr), _hashing_saves(self.ds.checkpoint_engine):
            self.ds.save_checkpoint(str(folder), tag=TAG, client_state=info, save_latest=False,
                                    exclude_frozen_parameters=self._leaves_out_frozen())
        if self.dist.is_main:  # written here, by us, so the manifest (hashed after save_state) covers them
            layout = {"zero_stage": self.parallel_cfg.zero_stage, "world_size": self.dist.world_size}
            (folder / LAYOUT).write_text(json.dumps(layout))
            (folder / LATEST).write_text(TAG)
        if self.ema:
            self._save_ema(folder, self.ema)

    def _save_ema(self, folder: Path, ema: EMA) -> None:
        """ZeRO-3: each rank writes its EMA partitions (ema-rank-NNNNN.pt); ZeRO-1/2: rank 0 the whole tensors, as
        one "rank". ema-layout.json names every tensor's shape and how many files share it."""
        stage3 = self.ds.zero_optimization_partition_weights()
        if stage3 or self.dist.is_main:
            filehash.save(ema.state_dict(), folder / EMA_RANK_FILE.format(rank=self.dist.rank if stage3 else 0))
        if self.dist.is_main:
            params = dict(self.module.named_parameters(remove_duplicate=False))
            shapes = {name: list(getattr(params[raw], "ds_shape", params[raw].shape))
                      for raw in params for name in [raw.replace(_WRAPPED, "")] if name in ema.averages}
            (folder / EMA_LAYOUT).write_text(json.dumps({"files": self.dist.world_size if stage3 else 1,
                                                         "shapes": shapes}))

    def load_state(self, folder: Path) -> None:
        """Load a DeepSpeed checkpoint; one of another world size or ZeRO stage is converted to a universal one first."""
        folder = Path(folder)
        if self.dist.is_main:
            _remove_stale_conversions(folder.parent, older_than=self._built_at)
        saved, layout = resumable_layout(folder, self.parallel_cfg.zero_stage)
        saved_ema = self.ema is not None and (folder / EMA_LAYOUT).is_file()
        if saved_ema and self.ema is not None:  # loaded here, whatever the layout; DeepSpeed's own state below
            load_ema_partition(folder, self.ema, self.ds.zero_optimization_partition_weights(), self.dist)
        restart_ema = self.ema is not None and not saved_ema  # saved without EMA: it starts from the loaded weights
        if layout.get("world_size", saved.get("world_size")) == self.dist.world_size and \
                layout.get("zero_stage", self.parallel_cfg.zero_stage) == self.parallel_cfg.zero_stage:
            self._load(folder, universal=False, restart_ema=restart_ema)
            return
        universal = universal_copy(folder, self.dist, self.parallel_cfg.zero_stage)
        try:
            self._load(universal, universal=True, restart_ema=restart_ema)
        finally:
            barrier(self.dist)
            if self.dist.is_main:
                shutil.rmtree(universal, ignore_errors=True)

    def _leaves_out_frozen(self) -> bool:
        """Whether checkpoints leave out the frozen parameters (DeepSpeed's exclude_frozen_parameters, all or
        none): when every one of them is a base tensor base.json names (skip_saving)."""
        frozen = {name.replace(_WRAPPED, "") for name, p in self.module.named_parameters() if not p.requires_grad}
        return bool(self.skip_saving) and frozen <= self.skip_saving

    def _load(self, folder: Path, universal: bool, restart_ema: bool = False) -> None:
        self.ds._config.load_universal_checkpoint = universal
        try:
            with contextlib.redirect_stdout(sys.stderr), _deepspeed_reads(folder):
                path, _ = self.ds.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False,
                                                  load_module_strict=not self._leaves_out_frozen())
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"checkpoint {folder}: DeepSpeed found no checkpoint under tag '{TAG}'")
        for group, settings in zip(self.optimizer.param_groups, self._group_settings, strict=True):
            group.update(settings)
        # The universal load gives every parameter the same `step` tensor, which AdamW then increments once
        # per group: give each its own.
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        if restart_ema and self.ema is not None:  # restart_ema: there is one
            self.ema.restart_from_weights()


def _cpu_adam(optimizer: torch.optim.Optimizer):
    """The same AdamW groups as DeepSpeedCPUAdam (DeepSpeed's optimizer offload needs its own CPU Adam)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    groups = [dict(g) for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                            adamw_mode=True)
