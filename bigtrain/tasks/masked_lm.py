"""masked_lm: BERT-style masked-token prediction, masks drawn per sample from (seed, key)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from bigtrain.tasks.base import IGNORE_INDEX, key_padding_mask, lm_metrics, pad, to_device, token_loss_sum


class MaskedLM:
    """BERT-style MLM: mask_prob of the non-special tokens are selected; of those 80% become the
    mask token, 10% a random token, 10% stay. Selection is drawn from (seed, sample key), so the
    same sample position gets the same masks on resume and on any world size. Loss over selected
    tokens only."""

    name = "masked_lm"
    eval_keys = ("loss_sum", "targets", "correct")

    def __init__(self, *, pad_id: int, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                 mask_prob: float, seed: int, **_):
        self.pad_id, self.mask_id, self.vocab_size = pad_id, mask_id, vocab_size
        self.special_ids = np.asarray(sorted(special_ids), dtype=np.int64)
        self.mask_prob, self.seed = mask_prob, seed

    def mask(self, tokens: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one sample: labels hold the original token where selected, else IGNORE_INDEX."""
        rng = np.random.default_rng([self.seed, key])
        selected = (rng.random(len(tokens)) < self.mask_prob) & ~np.isin(tokens, self.special_ids)
        action = rng.random(len(tokens))
        random_tokens = rng.integers(0, self.vocab_size, len(tokens))
        inputs = np.where(selected & (action < 0.8), self.mask_id, tokens)
        inputs = np.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        labels = np.where(selected, tokens, IGNORE_INDEX)
        return inputs, labels

    def collate(self, samples: list[np.ndarray], keys: Sequence[int], device: torch.device) -> dict:
        masked = [self.mask(s[:-1] if len(s) > 1 else s, int(k)) for s, k in zip(samples, keys)]
        lengths = np.array([len(m[0]) for m in masked])
        inputs = pad([m[0] for m in masked], self.pad_id)  # (B, T)
        labels = pad([m[1] for m in masked], IGNORE_INDEX)  # (B, T)
        return {**to_device(device, input_ids=inputs, labels=labels),
                "attn_mask": key_padding_mask(lengths, inputs.shape[1], device),
                "num_targets": int((labels != IGNORE_INDEX).sum()), "num_tokens": int(lengths.sum())}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], attn_mask=batch["attn_mask"])  # (B, T, V)

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return token_loss_sum(self._logits(model, batch), batch["labels"])

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logits, labels = self._logits(model, batch), batch["labels"]
        selected = labels != IGNORE_INDEX
        return {"loss_sum": float(token_loss_sum(logits, labels)), "targets": float(batch["num_targets"]),
                "correct": float((logits.argmax(-1)[selected] == labels[selected]).sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**lm_metrics(sums), "eval/mlm_accuracy": sums["correct"] / max(sums["targets"], 1.0)}
