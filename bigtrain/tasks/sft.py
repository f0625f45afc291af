"""sft: supervised fine-tuning of a decoder, loss on the response tokens only."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from bigtrain.tasks.base import IGNORE_INDEX, lm_loss_sum, lm_metrics, pad, to_device


class SFT:
    """Prompt → response fine-tuning of a decoder: loss on response tokens (and the closing EOS) only.
    Samples are {"tokens", "loss_mask", "segments"}; several examples packed into one sample attend
    only inside their own example (block-diagonal causal mask)."""

    name = "sft"
    eval_keys = ("loss_sum", "targets")

    def __init__(self, *, pad_id: int, loss_chunk: int = 0, **_):
        self.pad_id, self.loss_chunk = pad_id, loss_chunk

    def collate(self, samples: list[dict], keys: Sequence[int], device: torch.device) -> dict:
        inputs = pad([s["tokens"][:-1] for s in samples], self.pad_id)  # (B, T)
        # A target is a response token (or the closing EOS) of the same example as its input position.
        labels = pad([np.where(s["loss_mask"][1:] & (s["segments"][1:] == s["segments"][:-1]), s["tokens"][1:],
                                IGNORE_INDEX) for s in samples], IGNORE_INDEX)
        attn_mask = None
        if any(s["segments"][-1] > 0 for s in samples):  # packed: keep attention inside each example
            segments = pad([s["segments"][:-1] for s in samples], -1)  # (B, T); padding is its own segment
            t = segments.shape[1]
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            attn_mask = torch.from_numpy((same & np.tri(t, dtype=bool))[:, None]).to(device)  # (B, 1, T, T)
        return {**to_device(device, input_ids=inputs, labels=labels), "attn_mask": attn_mask,
                "num_targets": int((labels != IGNORE_INDEX).sum()),
                "num_tokens": sum(len(s["tokens"]) - 1 for s in samples)}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss_sum(model, batch, self.loss_chunk, attn_mask=batch["attn_mask"])

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum(model, batch)), "targets": float(batch["num_targets"])}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return lm_metrics(sums)
