"""Training objectives behind one small interface: collate, count targets, summed loss, eval metrics.

Loss contract (DESIGN.md): a task returns the SUM of per-target losses; the loop divides by the
global number of targets in the optimizer step (all ranks, all micro-batches), so the gradient
is the same whatever the micro-batch size, accumulation steps or world size.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class Task(Protocol):
    name: str
    eval_keys: tuple[str, ...]  # the sums eval_sums returns; all-reduced, then fed to eval_metrics

    def collate(self, samples: list[np.ndarray], device: torch.device) -> dict[str, torch.Tensor]: ...
    def count_targets(self, batch: dict[str, torch.Tensor]) -> int: ...
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...


class CausalLM:
    """Next-token prediction. Samples are token arrays of length <= seq_len + 1; shorter ones are
    right-padded (the padding never reaches a real token's attention because attention is causal)."""

    name = "causal_lm"
    eval_keys = ("loss_sum", "targets")

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, samples: list[np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        length = max(len(s) for s in samples) - 1
        inputs = np.full((len(samples), length), self.pad_id, dtype=np.int64)  # (B, T)
        labels = np.full((len(samples), length), IGNORE_INDEX, dtype=np.int64)  # (B, T)
        for row, sample in enumerate(samples):
            n = len(sample) - 1
            inputs[row, :n] = sample[:-1]
            labels[row, :n] = sample[1:]
        return {
            "input_ids": torch.from_numpy(inputs).to(device, non_blocking=True),
            "labels": torch.from_numpy(labels).to(device, non_blocking=True),
            "num_targets": int((labels != IGNORE_INDEX).sum()),  # counted on the host: no device sync
        }

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["num_targets"]

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"])  # (B, T, V)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum(model, batch)), "targets": float(self.count_targets(batch))}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / max(sums["targets"], 1.0)
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


TASKS = {"causal_lm": CausalLM}


def build_task(cfg_task, *, pad_id: int) -> Task:
    return TASKS[cfg_task.name](pad_id=pad_id)
