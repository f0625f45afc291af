"""GPU-only checks (marked `gpu`; skipped without CUDA): bf16 training on the device, MFU from the peak table."""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_train import read_metrics, train

pytestmark = pytest.mark.gpu


def test_bf16_training_on_cuda_uses_the_datasheet_peak(tmp_path, cache_dir):
    from bigtrain.hardware import peak_flops_per_sec

    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=10", "parallel.device=cuda", "parallel.precision=bf16")
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stderr
    records, evals = read_metrics(run_dir)
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    peak = peak_flops_per_sec(torch.device("cuda"), torch.bfloat16)
    assert peak > 1e14  # a datasheet tensor-core figure, not a measured CPU one
    assert all(r["perf/max_memory_gb"] > 0 for r in records)
