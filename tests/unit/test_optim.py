"""LR schedule and AdamW groups (bigtrain/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bigtrain.config import OptimConfig
from bigtrain.optim import build_optimizer, lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_and_ends_exactly_at_final_value(schedule):
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule=schedule, final_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    final = 1e-3 if schedule == "constant" else 1e-4
    assert lrs[-1] == final  # exact, not approximately
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after warmup


def test_cosine_midpoint():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", final_lr_ratio=0.0)
    assert lr_at(cfg, 50, 100) == pytest.approx(0.5)
    assert lr_at(cfg, 25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_groups_skip_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(OptimConfig(weight_decay=0.1), model, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight, norm bias


def test_a_warmup_longer_than_the_run_follows_the_warmup_line_to_the_end():
    cfg = OptimConfig(lr=1e-3, warmup_steps=50, schedule="cosine", final_lr_ratio=0.1)
    assert [lr_at(cfg, step, 10) for step in (1, 5, 10)] == pytest.approx([2e-5, 1e-4, 2e-4])
