"""The bare PyTorch training step the benchmarks measure bigtrain against (nanoGPT-shaped), one copy for all."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bare_optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.AdamW:
    """AdamW as bigtrain builds it by default: weight decay 0.1 on matrices only, betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def bare_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor,
              dtype: torch.dtype | None) -> torch.Tensor:
    """One step on `batch` (B, T + 1) token ids: forward (autocast in `dtype` when given), mean next-token
    cross-entropy, backward, clip at 1.0, update. Returns the loss, not read (the caller decides when)."""
    with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
