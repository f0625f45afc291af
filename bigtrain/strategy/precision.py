"""`parallel.precision` resolved to one table of dtypes, plus autocast and loss scaling for it.

The table is the contract every strategy implements and tests check real tensors against:
parameter, compute, gradient-reduce, master-weight and optimizer-state dtypes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PrecisionTable:
    name: str
    param: torch.dtype
    compute: torch.dtype
    grad_reduce: torch.dtype
    master_weights: torch.dtype
    optimizer_state: torch.dtype
    loss_scaling: bool

    def as_strings(self) -> dict[str, str]:
        return {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)) for k, v in asdict(self).items()}

    def format(self) -> str:
        rows = self.as_strings()
        return "precision " + " · ".join(f"{k}={v}" for k, v in rows.items() if k != "name") + f"  ({self.name})"


# Mixed precision keeps fp32 parameters, gradients and optimizer state; only the compute is low precision.
_TABLES = {
    "fp32": PrecisionTable("fp32", torch.float32, torch.float32, torch.float32, torch.float32, torch.float32, False),
    "bf16": PrecisionTable("bf16", torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32, False),
    "fp16": PrecisionTable("fp16", torch.float32, torch.float16, torch.float32, torch.float32, torch.float32, True),
    # Everything in bf16: half the memory of the weights and optimizer state, no fp32 master copy.
    "bf16-pure": PrecisionTable("bf16-pure", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16,
                                torch.bfloat16, False),
}

# (precision, strategy) -> table, where a strategy keeps its tensors differently from _TABLES.
_STRATEGY_TABLES: dict[tuple[str, str], PrecisionTable] = {
    # DeepSpeed casts the module itself to bf16/fp16 and reduces gradients in that dtype; its ZeRO optimizer
    # keeps fp32 master weights and fp32 Adam moments (bf16-pure is refused: it always keeps an fp32 master).
    ("fp32", "deepspeed"): _TABLES["fp32"],
    ("bf16", "deepspeed"): PrecisionTable("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32,
                                          torch.float32, False),
    ("fp16", "deepspeed"): PrecisionTable("fp16", torch.float16, torch.float16, torch.float16, torch.float32,
                                          torch.float32, True),
}


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


def scaled_optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, finite: bool) -> None:
    """Apply the update when gradients are finite (a decision every rank shares); always advance the loss
    scaler (backing off after a skipped step); clear the gradients."""
    if scaler:
        if finite:
            scaler.step(optimizer)
        scaler.update(new_scale=None if finite else scaler.get_scale() * scaler.get_backoff_factor())
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
