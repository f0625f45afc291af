"""The memory plan's pieces: activations traced on width-scaled copies equal full-width traces and what autograd
keeps by hand count; sharding divides what it should; `bigtrain check` says whether a plan fits (exit 1 if not).
tests/integration/test_memory_plan.py holds the plans against measured peaks."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from bigtrain.plan import memory as memory_plan
from bigtrain.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from bigtrain.plan.memory import plan_memory, trace_activations
from bigtrain.models import resolve_model_spec
from bigtrain.parallel import precision_table
from tests.conftest import run_cli, tiny_recipe, write_recipe

GPT2_STYLE = ModelConfig(preset="debug", n_layers=2, d_model=256, n_heads=4, d_ff=1024, max_seq_len=128)
LLAMA_STYLE = ModelConfig(preset="llama-1b", n_layers=2, d_model=256, n_heads=8, n_kv_heads=2, d_ff=768,
                          max_seq_len=128)
FP32 = dict(param_dtype=torch.float32, compute_dtype=torch.float32)


def test_a_gpt2_block_keeps_sixteen_widths_per_token_and_only_its_input_under_full_checkpointing():
    """By hand, per token: the block's input, the first norm's output, q|k|v (3), attention's output, the residual,
    the second norm's output, the MLP's 4-wide hidden before and after GELU (8): 16 widths of fp32."""
    spec = resolve_model_spec(GPT2_STYLE, 512)
    tokens = 2 * 128
    none = trace_activations(spec, tokens=tokens, seq_len=128, checkpointing="none", **FP32)
    full = trace_activations(spec, tokens=tokens, seq_len=128, checkpointing="full", **FP32)
    width = tokens * spec.d_model * 4
    assert none.saved_per_block == pytest.approx(16 * width, rel=0.02)  # + norm statistics, attention's logsumexp
    assert full.saved_per_block == pytest.approx(width, rel=0.01)
    assert full.block == none.saved_per_block  # what full checkpointing recomputes in backward


@pytest.mark.parametrize("model", [GPT2_STYLE, LLAMA_STYLE], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_a_width_scaled_trace_equals_the_full_width_one(model, checkpointing, monkeypatch):
    spec = resolve_model_spec(model, 1024)
    scaled = trace_activations(spec, tokens=128, seq_len=64, checkpointing=checkpointing, **FP32)
    assert memory_plan._scale(spec) > 1
    monkeypatch.setattr(memory_plan, "TRACE_HEAD_DIM", 10**6)  # no scaling: the model's own widths
    assert memory_plan._scale(spec) == 1
    exact = trace_activations(spec, tokens=128, seq_len=64, checkpointing=checkpointing, **FP32)
    for field in ("saved_per_block", "block", "outside", "backward_extra"):
        assert getattr(scaled, field) == pytest.approx(getattr(exact, field), rel=0.03), field


def _plan(strategy: str, world_size: int, **parallel):
    cfg = Config(model=GPT2_STYLE, data=DataConfig(seq_len=128), train=TrainConfig(global_batch_size=8 * world_size,
                                                                                      micro_batch_size=8),
                 parallel=ParallelConfig(precision="fp32", strategy=strategy, **parallel))
    spec = resolve_model_spec(cfg.model, 512)
    return plan_memory(cfg, spec, world_size=world_size, table=precision_table("fp32", strategy), strategy=strategy,
                       device_type="cuda")


def test_sharding_divides_weights_gradients_and_optimizer_state_by_the_ranks():
    single, ddp, fsdp = _plan("single", 1), _plan("ddp", 4), _plan("fsdp", 4)
    zero2, zero3 = _plan("deepspeed", 4, zero_stage=2), _plan("deepspeed", 4, zero_stage=3)
    n = single.pieces["weights"] // 4  # fp32 weights of the whole model
    assert ddp.pieces["weights"] == zero2.pieces["weights"] == 4 * n
    assert fsdp.pieces["weights"] == pytest.approx(n, abs=64) and zero3.pieces["weights"] == fsdp.pieces["weights"]
    assert ddp.pieces["optimizer state"] == 8 * n and fsdp.pieces["optimizer state"] == pytest.approx(2 * n, abs=64)
    assert zero2.pieces["optimizer state"] == zero3.pieces["optimizer state"] == fsdp.pieces["optimizer state"]
    assert ddp.pieces["gradients"] == 4 * n  # DDP's buckets, always there
    assert zero3.pieces["master weights"] == pytest.approx(n, abs=64)  # DeepSpeed's fp32 copy of its partition
    assert single.pieces["activations"] == ddp.pieces["activations"]  # a micro-batch is a micro-batch
    assert "runtime" not in [k for k, v in single.pieces.items() if v]  # CUDA: the allocator counts tensors only


def test_checkpointing_lowers_the_planned_peak():
    none, full = _plan("single", 1), _plan("single", 1, activation_checkpointing="full")
    selective = _plan("single", 1, activation_checkpointing="selective")
    assert full.pieces["activations"] < selective.pieces["activations"] < none.pieces["activations"]
    assert full.peak < none.peak


def test_check_says_whether_the_plan_fits_and_exits_1_when_it_does_not(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "cache", tmp_path / "runs"))
    roomy = run_cli("check", str(recipe), "--world-size", "2", "--device-memory-gb", "64")
    assert roomy.returncode == 0, roomy.stderr
    assert re.search(r"memory\s+per rank, 2 ranks on 1 node", roomy.stdout)
    assert re.search(r"fits in 64 GB", roomy.stdout)
    tight = run_cli("check", str(recipe), "--device-memory-gb", "0.001")
    assert tight.returncode == 1 and "does NOT fit in 0.001 GB" in tight.stdout
    bad = run_cli("check", str(recipe), "--world-size", "3", "--nodes", "2")
    assert bad.returncode == 2 and "--world-size=3 --nodes=2" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_lora_plan_holds_the_frozen_base_in_the_compute_dtype_and_state_for_the_adapters_only():
    from bigtrain.config import LoraConfig

    def plan(lora):
        cfg = Config(model=dataclasses.replace(GPT2_STYLE, lora=lora), data=DataConfig(seq_len=128),
                     train=TrainConfig(global_batch_size=8, micro_batch_size=8),
                     parallel=ParallelConfig(precision="bf16", strategy="single"))
        return plan_memory(cfg, resolve_model_spec(cfg.model, 512), world_size=1, table=precision_table("bf16", "single"),
                           strategy="single", device_type="cuda")

    full, lora = plan(None), plan(LoraConfig(rank=4, alpha=8.0, targets=("qkv", "out", "mlp")))
    spec = resolve_model_spec(GPT2_STYLE, 512)
    d, f, layers = spec.d_model, spec.d_ff, spec.n_layers
    linears = layers * (4 * d * d + 2 * d * f + 3 * d + d + f + d)  # the blocks' Linear weights and biases
    adapters = layers * 4 * ((d + 3 * d) + (d + d) + (d + f) + (f + d))  # rank 4 × (in + out) per Linear
    assert full.pieces["weights"] - lora.pieces["weights"] == pytest.approx(2 * linears - 4 * adapters, abs=16)
    assert lora.pieces["optimizer state"] == 8 * adapters
