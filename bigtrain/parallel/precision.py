"""`parallel.precision` resolved to one table of dtypes, plus autocast and loss scaling for it.

The table is the contract every strategy implements and tests check real tensors against:
parameter, compute, gradient-reduce, gradient-accumulation (micro-batches summed until the step),
master-weight and optimizer-state dtypes.

`auto` (the default) is resolved first, once per job on rank 0, from the hardware: on CUDA bf16 where the
GPU has it, else fp16 with loss scaling; on a CPU bf16 only where bf16 matmuls are native (an AVX2-only CPU
runs them ~50× slower than fp32), else fp32. A launcher's explicit choice (accelerate's
`--mixed_precision`, a DeepSpeed config's `bf16`/`fp16` section) comes before the hardware.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import cast

import torch

from bigtrain.core import hardware
from bigtrain.parallel.dist import Dist, broadcast_object


@dataclass(frozen=True)
class PrecisionTable:
    name: str
    param: torch.dtype
    compute: torch.dtype
    grad_reduce: torch.dtype
    grad_accum: torch.dtype
    master_weights: torch.dtype
    optimizer_state: torch.dtype
    loss_scaling: bool

    def as_strings(self) -> dict[str, str]:
        return {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)) for k, v in asdict(self).items()}

    def format(self) -> str:
        rows = self.as_strings()
        return "precision " + " · ".join(f"{k}={v}" for k, v in rows.items() if k != "name") + f"  ({self.name})"


# Mixed precision keeps fp32 parameters, gradients and optimizer state; only the compute is low precision.
# Columns: param, compute, grad_reduce, grad_accum, master_weights, optimizer_state, loss_scaling.
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_TABLES = {
    "fp32": PrecisionTable("fp32", _F32, _F32, _F32, _F32, _F32, _F32, False),
    "bf16": PrecisionTable("bf16", _F32, _BF16, _F32, _F32, _F32, _F32, False),
    "fp16": PrecisionTable("fp16", _F32, _F16, _F32, _F32, _F32, _F32, True),
    # Everything in bf16: half the memory of the weights and optimizer state, no fp32 master copy.
    "bf16-pure": PrecisionTable("bf16-pure", _BF16, _BF16, _BF16, _BF16, _BF16, _BF16, False),
}

# (precision, strategy) -> table, where a strategy keeps its tensors differently from _TABLES.
_STRATEGY_TABLES: dict[tuple[str, str], PrecisionTable] = {
    # DeepSpeed casts the module itself to bf16/fp16 and reduces gradients in that dtype; its ZeRO optimizer
    # keeps fp32 master weights and fp32 Adam moments (bf16-pure is refused: it always keeps an fp32 master).
    # bf16 accumulates the reduced micro-batch gradients in fp32 (data_types.grad_accum_dtype, ZeRO 2/3).
    ("fp32", "deepspeed"): _TABLES["fp32"],
    ("bf16", "deepspeed"): PrecisionTable("bf16", _BF16, _BF16, _BF16, _F32, _F32, _F32, False),
    ("fp16", "deepspeed"): PrecisionTable("fp16", _F16, _F16, _F16, _F16, _F32, _F32, True),
}


def hold_frozen_linears_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the blocks' frozen Linear weights and biases (a LoRA base) in `dtype`, the compute dtype of mixed
    precision (engines call it when the table's compute and parameter dtypes differ). Autocast (and FSDP's mixed
    precision) casts them there at every use anyway, so forward and gradients are unchanged, while the frozen base
    takes half the memory and keeps no fp32 copy. Embeddings and norms keep the parameter dtype (the residual
    stream and the norms' statistics stay fp32)."""
    for block in cast(torch.nn.ModuleList, model.blocks):  # a Transformer's (nn.Module: typed Tensor | Module)
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                for param in (module.weight, module.bias):
                    if param is not None and not param.requires_grad:
                        param.data = param.data.to(dtype)


def freeze_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` made a frozen inference copy (a distillation teacher): no gradients, eval mode (no dropout), every
    parameter stored in `dtype`, the compute dtype (no fp32 master copy: nothing updates it). Buffers keep their
    dtype (RoPE's tables are computed in fp32). Works on the meta device."""
    model.requires_grad_(False).eval()
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


@dataclass(frozen=True)
class Resolved:
    """What `parallel.precision` means on this job: the precision name (never `auto`) and why."""

    requested: str
    name: str
    reason: str

    def describe(self) -> str:
        if self.requested == "auto":
            return f"auto → {self.name}: {self.reason}"
        return f"{self.name}: {self.reason}"


def resolve_precision(requested: str, device: torch.device, *, cpu: hardware.CpuInfo | None = None,
                      launcher_choice: str | None = None) -> Resolved:
    """`auto` resolved on this process's hardware (explicit names are kept). `cpu` defaults to probing this
    CPU; `launcher_choice` is a precision a launcher's own config asks for (it wins over the hardware)."""
    if requested != "auto":
        return Resolved(requested, requested, "set in the recipe")
    if launcher_choice:
        return Resolved(requested, launcher_choice, "the launcher's config asks for it")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Resolved(requested, "bf16", f"{name} computes in bf16 natively")
        return Resolved(requested, "fp16", f"{name} has no native bf16: fp16 with dynamic loss scaling")
    if device.type == "cpu":
        native, reason = hardware.cpu_bf16_native(cpu if cpu is not None else hardware.probe_cpu())
        return Resolved(requested, "bf16" if native else "fp32", reason)
    return Resolved(requested, "fp32", f"no low-precision rule for {device.type}")


def resolve_job_precision(dist: Dist, requested: str, *, launcher_choice: str | None = None, probe=None) -> Resolved:
    """`resolve_precision` on rank 0, the same answer on every rank (nodes may differ; the job must not).
    `probe` returns the CpuInfo to decide from (default: this CPU's)."""
    resolved = None
    if dist.is_main:
        resolved = resolve_precision(requested, dist.device, launcher_choice=launcher_choice,
                                     cpu=probe() if probe is not None else None)
    return broadcast_object(dist, resolved)


def slow_precision_warning(resolved: Resolved, device: torch.device, *, cpu: hardware.CpuInfo | None = None) -> str | None:
    """One line when an explicit bf16 / bf16-pure runs on a CPU without native bf16 matmul, with how much
    slower it measured there (both peaks are cached); None otherwise."""
    if torch.device(device).type != "cpu" or resolved.name not in ("bf16", "bf16-pure"):
        return None
    native, reason = hardware.cpu_bf16_native(cpu if cpu is not None else hardware.probe_cpu())
    if native:
        return None
    table = _TABLES[resolved.name]
    fp32 = hardware.matmul_peak(device, torch.float32).flops_per_sec
    low = hardware.matmul_peak(device, table.compute, table.param).flops_per_sec
    if fp32 < 1.2 * low:  # the flags say no, but it measured about as fast: nothing worth a warning
        return None
    return (f"warning: parallel.precision={resolved.name} but {reason}: bf16 matmuls measured {fp32 / low:.1f}× "
            f"slower than fp32 here — set parallel.precision=auto (or fp32) to train at full speed")


def precision_table(name: str, strategy: str = "single") -> PrecisionTable:
    """The dtypes `parallel.precision` means under `strategy` (the same under every launcher)."""
    return _STRATEGY_TABLES.get((name, strategy), _TABLES[name])


def autocast(table: PrecisionTable, device: torch.device):
    """Autocast context for the forward pass (a no-op when parameters are already in the compute dtype)."""
    if table.compute == table.param:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=table.compute)


def make_grad_scaler(table: PrecisionTable, device: torch.device) -> torch.amp.GradScaler | None:
    """Dynamic loss scaler for fp16 (None otherwise)."""
    if not table.loss_scaling:
        return None
    return torch.amp.GradScaler(device.type)


def scaled_optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                          finite: bool | torch.Tensor) -> None:
    """Apply the update when gradients are finite (a decision every rank shares); always advance the loss
    scaler (backing off after a skipped step); clear the gradients.

    `finite` may be a device bool tensor (the loop's: not read on the host). A fused optimizer without a loss
    scaler (AdamW on CUDA) then skips on the device: its `found_inf` input leaves the weights, moments and step
    count as they were, with no host sync. Anything else reads the flag here, the step's one host sync."""
    if isinstance(finite, torch.Tensor) and scaler is None and _skips_on_device(optimizer):
        setattr(optimizer, "found_inf", (~finite).float())  # read by fused Adam/AdamW's step (not an Optimizer field)
        try:
            optimizer.step()
        finally:
            delattr(optimizer, "found_inf")
        optimizer.zero_grad(set_to_none=True)
        return
    finite = bool(finite)
    if scaler:
        if finite:
            scaler.step(optimizer)
            scaler.update()
        else:  # maybe only another rank overflowed: back off as update() does on an inf, growth count restarting
            scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
            scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0})
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW take a found_inf tensor and skip on the device (other torch optimizers refuse one)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups)
