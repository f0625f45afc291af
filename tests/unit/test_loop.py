"""The loop's gradient accumulation (bigtrain/train/loop.py): same global batch → same gradients and loss,
whatever the micro-batch size — packed and padded LM data, ragged classification and SFT batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bigtrain.config import build_config
from bigtrain.data import GlobalSampler
from bigtrain.train.loop import accumulate_gradients
from bigtrain.train.build import build
from bigtrain.parallel import init_distributed
from tests.conftest import tiny_recipe

DOCSTRINGS = {"source": "python-stdlib-docstrings", "max_documents": 300, "validation_split": 0.1, "packing": False,
              "seq_len": 64}


def step_gradients(cfg, micro: int) -> tuple[torch.Tensor, float]:
    """Flattened gradients and the logged loss of the first optimizer step with micro-batch size `micro`."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
    b = build(cfg, init_distributed("cpu"))
    sampler = GlobalSampler(len(b.data.train), seed=0, global_batch_size=8, micro_batch_size=micro, rank=0, world_size=1)
    batches = [b.task.collate([b.data.train[int(i)] for i in idx], range(j * micro, (j + 1) * micro), b.dist.device)
               for j, idx in enumerate(sampler.rank_micro_batches(0))]
    targets = sum(b.task.count_targets(batch) for batch in batches)
    loss_sum = accumulate_gradients(b.engine, b.task, batches, 1 / targets)
    grads = torch.cat([p.grad.flatten() for p in b.model.parameters()])
    return grads, float(loss_sum) / targets


def assert_accumulation_invariant(cfg) -> None:
    reference, ref_loss = step_gradients(cfg, 8)
    for micro in (2, 1):
        grads, loss = step_gradients(cfg, micro)
        relative = float((grads - reference).norm() / reference.norm())
        assert relative <= 1e-6, (micro, relative)
        assert loss == pytest.approx(ref_loss, rel=1e-6)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_accumulation_gives_the_same_gradients(cache_dir, ragged_corpus, tmp_path, packing):
    data_cfg = {"packing": packing} if packing else {"packing": False, "source": str(ragged_corpus)}
    cfg = build_config(tiny_recipe(cache_dir, tmp_path, data=data_cfg))
    if not packing:  # the padded case must really contain padding
        data = build(cfg, init_distributed("cpu")).data
        lengths = {len(data.train[i]) for i in range(len(data.train))}
        assert min(lengths) < 16 and max(lengths) == 33  # 2..33 tokens: lots of padding at seq_len 32
    assert_accumulation_invariant(cfg)


@pytest.mark.parametrize("task, arch", [("classification", "encoder"), ("classification", "decoder"), ("sft", "decoder")])
def test_accumulation_with_ragged_task_batches(cache_dir, tmp_path, task, arch):
    cfg = build_config(tiny_recipe(cache_dir, tmp_path, task={"name": task}, data=DOCSTRINGS,
                                   model={"arch": arch, "max_seq_len": 128}))
    data = build(cfg, init_distributed("cpu")).data
    lengths = [len(data.train[i]["tokens"]) for i in range(64)]
    assert max(lengths) >= 2 * min(lengths)  # very uneven examples
    assert_accumulation_invariant(cfg)


@pytest.mark.parametrize("mode", [True, "full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(cache_dir, tmp_path, mode):
    """Full (true: full) and selective checkpointing (matmul and attention outputs kept, the rest recomputed)."""
    cfg = build_config(tiny_recipe(cache_dir, tmp_path))
    reference, ref_loss = step_gradients(cfg, 4)
    ac = build_config(tiny_recipe(cache_dir, tmp_path, parallel={"activation_checkpointing": mode}))
    grads, loss = step_gradients(ac, 4)
    assert float((grads - reference).norm() / reference.norm()) <= 1e-6
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_prefetch_makes_the_next_batches_on_its_thread_and_gives_what_fetch_gives():
    import threading

    from bigtrain.train.batches import Prefetch

    calls = []

    def fetch(position):
        calls.append((position, threading.current_thread().name))
        return [{"position": position}]

    with Prefetch(fetch) as batches_at:
        assert batches_at.get(0) == [{"position": 0}]  # nothing made ahead: made now, on the loop's thread
        batches_at.ahead(8)
        assert batches_at.get(8) == [{"position": 8}]  # made ahead, on the batch thread
        batches_at.ahead(16)
        assert batches_at.get(24) == [{"position": 24}]  # another position (a resume, a jump): made now
    threads = dict(calls)
    assert {0, 8, 24} <= set(threads) <= {0, 8, 16, 24}  # 16: cancelled, unless its thread had started it
    assert threads[8].startswith("bigtrain-batches") and threads.get(16, "bigtrain-batches").startswith("bigtrain-batches")
    assert not threads[0].startswith("bigtrain-batches") and not threads[24].startswith("bigtrain-batches")
