"""Single-process engine: precision table vs real dtypes, fp16 loss scaling and skipped steps."""

from __future__ import annotations

import pytest
import torch

from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from bigtrain.loop import TrainingError, _count_skip
from bigtrain.checkpoint import TrainState
from bigtrain.models import build_model
from bigtrain.optim import build_optimizer
from bigtrain.strategy import build_engine, init_distributed, precision_table


def make_engine(precision: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug"), 128)
    dist = init_distributed("cpu")
    return build_engine(ParallelConfig(precision=precision), model,
                        lambda m: build_optimizer(OptimConfig(lr=1e-2), m, dist.device), dist)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_real_dtypes_match_the_precision_table(precision):
    engine = make_engine(precision)
    table = precision_table(precision)
    tokens = torch.randint(0, 128, (2, 16))
    with engine.autocast():
        logits = engine.model(tokens)
    assert logits.dtype == table.compute
    engine.backward(logits.float().sum())
    engine.clip_grad_norm(1.0)
    engine.step(True)
    for p in engine.module.parameters():
        assert p.dtype == table.param
    for state in engine.optimizer.state.values():
        assert state["exp_avg"].dtype == table.optimizer_state
    assert (engine.loss_scale is not None) == table.loss_scaling


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    engine = make_engine("fp16")
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    scale = engine.loss_scale
    with engine.autocast():
        loss = engine.model(torch.randint(0, 128, (2, 16))).float().sum()
    engine.backward(loss * float("inf"))
    norm = engine.clip_grad_norm(1.0)
    assert not torch.isfinite(norm)
    engine.step(False)
    assert engine.loss_scale == scale / 2
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_steps_are_counted_and_stop_after_the_limit():
    cfg = type("Cfg", (), {"train": TrainConfig(max_skipped_steps=3)})()
    state = TrainState(step=5)
    _count_skip(cfg, state, False, float("nan"), float("nan"), None)
    _count_skip(cfg, state, True, 1.0, 1.0, None)  # a good step resets the run of skips
    assert (state.skipped_steps, state.consecutive_skips) == (1, 0)
    for _ in range(2):
        _count_skip(cfg, state, False, float("inf"), float("nan"), None)
    # fp16 overflow with a finite loss: counted, but the scaler is backing off, so not against the limit
    _count_skip(cfg, state, False, 2.0, float("inf"), 1024.0)
    assert (state.skipped_steps, state.consecutive_skips) == (4, 2)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        _count_skip(cfg, state, False, float("nan"), float("nan"), None)
