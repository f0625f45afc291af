"""The optimizer-step pieces the engines that step their own optimizer share (single, ddp, fsdp; DeepSpeed steps
inside its own engine): backward through the fp16 loss scaler, the update that is skipped when gradients are not
finite while the scaler still advances, the EMA's update after it, and the scale a step used."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bigtrain.parallel.precision import scaled_optimizer_step

if TYPE_CHECKING:
    from bigtrain.parallel.ema import EMA


class ScaledSteps:
    """Mixed into LocalEngine and FSDPEngine, which set `optimizer` and `scaler` (precision.make_grad_scaler: None
    unless fp16); `ema` is attached by the run (optim.ema_decay)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None = None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_gradients(self) -> None:
        """Gradients back to their true size before their norm is measured (fp16; a no-op otherwise)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)

    def step(self, finite: bool | torch.Tensor) -> None:
        """Apply the update when gradients are finite (a decision every rank shares); always advance the scaler."""
        scaled_optimizer_step(self.optimizer, self.scaler, finite)
        if self.ema:
            self.ema.update(finite)

    def step_loss_scale(self) -> torch.Tensor | None:
        """The scale this step's backward used, as the scaler's device tensor (a copy; not read)."""
        scale = self.scaler._get_scale_async() if self.scaler else None
        return None if scale is None else scale.detach().clone()

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None
