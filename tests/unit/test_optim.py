"""LR schedule and AdamW groups (bigtrain/train/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bigtrain.config import OptimConfig
from bigtrain.train.optim import build_optimizer, lr_at


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


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_in_its_shape_to_the_exact_final_value(shape):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_steps=20, decay_shape=shape, final_lr_ratio=0.1)
    lrs = {s: lr_at(cfg, s, 100) for s in range(1, 101)}
    assert lrs[5] == pytest.approx(0.5) and all(lrs[s] == 1.0 for s in range(10, 81))  # warmup, then stable
    progress = 0.25  # step 85: 5 of the 20 decay steps
    expected = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "1-sqrt": 1 - math.sqrt(progress)}
    assert lrs[85] == pytest.approx(0.1 + 0.9 * expected[shape])
    assert lrs[100] == 0.1 and all(lrs[s] > lrs[s + 1] for s in range(80, 100))


def test_wsd_with_a_larger_max_steps_extends_the_stable_phase():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_steps=10, final_lr_ratio=0.0)
    assert [lr_at(cfg, s, 50) for s in (40, 45, 50)] == pytest.approx([1.0, 1 - math.sqrt(0.5), 0.0])
    assert [lr_at(cfg, s, 80) for s in (40, 70, 75, 80)] == pytest.approx([1.0, 1.0, 1 - math.sqrt(0.5), 0.0])
