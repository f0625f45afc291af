"""GPU-only checks (marked `gpu`; skipped without CUDA): bf16 training on the device, MFU from the peak table."""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_train import read_metrics, train

pytestmark = pytest.mark.gpu


def test_bf16_training_on_cuda_uses_the_datasheet_peak(tmp_path, cache_dir):
    from bigtrain.core.hardware import peak_flops_per_sec

    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=10", "parallel.device=cuda", "parallel.precision=bf16")
    assert result.returncode == 0, result.stderr
    assert "on cuda" in result.stderr
    records, evals = read_metrics(run_dir)
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    peak = peak_flops_per_sec(torch.device("cuda"), torch.bfloat16)
    assert peak > 1e14  # a datasheet tensor-core figure, not a measured CPU one
    assert all(r["perf/max_memory_gb"] > 0 for r in records)


def test_document_mask_on_cuda_runs_flex_attention_equal_to_the_dense_mask():
    """data.document_mask on CUDA: the model builds a FlexAttention BlockMask (compiled flex kernel, no (T, T)
    mask) whose loss and every gradient equal the dense-mask SDPA path's (fp32), with grouped-query attention."""
    from bigtrain.config import ModelConfig
    from bigtrain.models import build_model
    from bigtrain.models.attention import document_attention
    from bigtrain.tasks import CausalLM

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", max_seq_len=256, n_kv_heads=2), 500).cuda()
    eos = 0
    windows = [torch.randint(1, 500, (257,)).numpy() for _ in range(4)]
    for w in windows:
        w[torch.randint(0, 257, (6,)).numpy()] = eos
    task = CausalLM(pad_id=1, eos_id=eos, document_mask=True)
    batch = task.collate(windows, list(range(4)), torch.device("cuda"))
    grads = {}
    for flex in (True, False):
        model.zero_grad()
        mask = document_attention(batch["documents"], flex=flex)
        assert (type(mask).__name__ == "BlockMask") == flex
        logits = model(batch["input_ids"], attn_mask=mask, positions=batch["positions"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        loss.backward()
        grads[flex] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-4, atol=1e-3)
    for name, grad in grads[True][1].items():
        torch.testing.assert_close(grad, grads[False][1][name], rtol=1e-3, atol=1e-4, msg=name)
    # The task's own path on CUDA takes flex (the model decides from the device).
    torch.testing.assert_close(task.loss_sum(model, batch).detach(), grads[True][0], rtol=1e-4, atol=1e-3)


def test_prefetch_copies_pinned_batches_on_its_own_stream_and_the_compute_stream_waits_for_them():
    """On CUDA the batch thread pins the host batches and copies them on a side stream; get() gives the same
    values on the device, and the compute stream's work on them starts only after the copies (an event)."""
    from bigtrain.train.batches import Prefetch

    device = torch.device("cuda")
    host = {p: [{"input_ids": torch.arange(p, p + 4096).view(2, -1), "num_targets": 8}] for p in (0, 8)}
    with Prefetch(lambda p: host[p], device) as batches_at:
        torch.cuda._sleep(50_000_000)  # the compute stream busy: a copy queued behind it would wait
        batches_at.ahead(8)
        first = batches_at.get(0)  # made now (nothing ahead for 0)
        made = batches_at.get(8)
        assert batches_at.copies is not None and batches_at.copies != torch.cuda.current_stream()
    for got, p in ((first, 0), (made, 8)):
        assert got[0]["num_targets"] == 8 and got[0]["input_ids"].device.type == "cuda"
        assert torch.equal(got[0]["input_ids"].cpu(), host[p][0]["input_ids"])  # read after the copy, on the compute stream
