"""The interface every training objective implements, and the collate and loss pieces they share.

Loss contract: a task returns the SUM of per-target losses; the loop divides by the
global number of targets in the optimizer step (all ranks, all micro-batches), so the gradient
is the same whatever the micro-batch size, accumulation steps or world size. A target is a
predicted token (causal_lm, sft), a selected token (masked_lm) or an example (classification).
Every batch also carries `num_tokens`, its non-padding input tokens, for throughput and MFU.

`collate` gets each sample's key: a unique, world-size-independent integer (its global position
in the training order, or its index offset by EVAL_KEY_OFFSET in eval). Tasks that draw per-sample
randomness (masked_lm) seed from (seed, key), so masks survive resume and any world size.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
EVAL_KEY_OFFSET = 1 << 48  # eval samples draw from a stream disjoint from training positions


class Task(Protocol):
    name: str
    eval_keys: tuple[str, ...]  # the sums eval_sums returns; all-reduced, then fed to eval_metrics

    def collate(self, samples: list, keys: Sequence[int], device: torch.device) -> dict: ...
    def count_targets(self, batch: dict) -> int: ...
    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor: ...
    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]: ...
    def eval_metrics(self, sums: dict[str, float]) -> dict: ...  # eval/… scalars (+ a report: see eval/report.py)


def pad(rows: list[np.ndarray], value: int, length: int | None = None) -> np.ndarray:
    """Right-pad 1-D arrays into a (B, T) int64 array."""
    length = length or max(len(r) for r in rows)
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def key_padding_mask(lengths: np.ndarray, length: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, 1, T) bool, True where a key is a real token; None when nothing is padded."""
    if (lengths == length).all():
        return None
    mask = np.arange(length)[None, :] < lengths[:, None]
    return torch.from_numpy(mask[:, None, None, :]).to(device)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(model: nn.Module, batch: dict, loss_chunk: int, **inputs) -> torch.Tensor:
    """Σ token cross-entropy of the next-token logits: from the (B, T, V) logits, or (loss_chunk > 0,
    task.loss_chunk_tokens) computed by the model that many positions at a time, the logits never whole."""
    if loss_chunk:
        return model(batch["input_ids"], labels=batch["labels"], loss_chunk=loss_chunk, **inputs)
    return token_loss_sum(model(batch["input_ids"], **inputs), batch["labels"])


def lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["loss_sum"] / max(sums["targets"], 1.0)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def to_device(device: torch.device, **arrays: np.ndarray) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in arrays.items()}
