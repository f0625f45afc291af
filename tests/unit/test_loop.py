"""The loop's gradient accumulation (bigtrain/loop.py): same global batch → same gradients and loss,
whatever the micro-batch size, with packed sequences and with padded ones."""

from __future__ import annotations

import pytest
import torch

from bigtrain.config import build_config
from bigtrain.data import GlobalSampler, load_prepared, prepare_data
from bigtrain.loop import accumulate_gradients
from bigtrain.models import build_model
from bigtrain.optim import build_optimizer
from bigtrain.strategy import build_engine, init_distributed
from bigtrain.tasks import build_task
from tests.conftest import tiny_recipe


def step_gradients(cfg, data, micro: int) -> tuple[torch.Tensor, float]:
    """Flattened gradients and the logged loss of the first optimizer step with micro-batch size `micro`."""
    dist = init_distributed("cpu")
    task = build_task(cfg.task, data, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.vocab_size)
    engine = build_engine(cfg.parallel, model, build_optimizer(cfg.optim, model, dist.device), dist)
    sampler = GlobalSampler(len(data.train), seed=0, global_batch_size=8, micro_batch_size=micro, rank=0, world_size=1)
    batches = [task.collate([data.train[int(i)] for i in idx], idx, dist.device) for idx in sampler.rank_micro_batches(0)]
    targets = sum(task.count_targets(b) for b in batches)
    loss_sum = accumulate_gradients(engine, task, batches, 1 / targets)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grads, float(loss_sum) / targets


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_accumulation_gives_the_same_gradients(cache_dir, ragged_corpus, tmp_path, packing):
    data_cfg = {"packing": packing} if packing else {"packing": False, "source": str(ragged_corpus)}
    raw = tiny_recipe(cache_dir, tmp_path, data=data_cfg)
    cfg = build_config(raw)
    prepare_data(cfg.data, log=lambda m: None)
    data = load_prepared(cfg.data)
    if not packing:  # the padded case must really contain padding
        lengths = {len(data.train[i]) for i in range(len(data.train))}
        assert min(lengths) < 16 and max(lengths) == 33  # 2..33 tokens: lots of padding at seq_len 32
    reference, ref_loss = step_gradients(cfg, data, 8)
    for micro in (2, 1):
        grads, loss = step_gradients(cfg, data, micro)
        relative = float((grads - reference).norm() / reference.norm())
        assert relative <= 1e-6, (micro, relative)
        assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(cache_dir, tmp_path):
    cfg = build_config(tiny_recipe(cache_dir, tmp_path))
    prepare_data(cfg.data, log=lambda m: None)
    data = load_prepared(cfg.data)
    reference, ref_loss = step_gradients(cfg, data, 4)
    ac = build_config(tiny_recipe(cache_dir, tmp_path, parallel={"activation_checkpointing": True}))
    grads, loss = step_gradients(ac, data, 4)
    assert float((grads - reference).norm() / reference.norm()) <= 1e-6
    assert loss == pytest.approx(ref_loss, rel=1e-6)
