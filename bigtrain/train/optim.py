"""AdamW with weight-decay groups and the LR schedule (warmup, then cosine / linear / constant, or
warmup-stable-decay)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(cfg, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norm weights) do not. Fused on CUDA."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:  # a ZeRO-3 partition is flat: its real shape is ds_shape
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)


def lr_at(cfg, step: int, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): linear warmup, then decay to lr*final_lr_ratio exactly at max_steps.
    wsd: lr until the last `decay_steps` steps, which decay in `decay_shape`; a pure function of (step,
    max_steps), so a run resumed with a larger max_steps stays at lr longer and then decays exactly."""
    peak, warmup = cfg.lr, cfg.warmup_steps
    if step <= warmup:
        return peak * step / warmup
    if cfg.schedule == "constant":
        return peak
    final = peak * cfg.final_lr_ratio
    shape = cfg.schedule
    if shape == "wsd":
        decay_start = max_steps - cfg.decay_steps
        if step <= decay_start:
            return peak
        progress, shape = min(1.0, (step - decay_start) / cfg.decay_steps), cfg.decay_shape
    else:
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if shape == "linear":
        return final + (peak - final) * (1.0 - progress)
    if shape == "1-sqrt":
        return final + (peak - final) * (1.0 - math.sqrt(progress))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
