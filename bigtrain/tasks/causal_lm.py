"""causal_lm: next-token prediction, optionally keeping packed documents apart (data.document_mask)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from bigtrain.tasks.base import IGNORE_INDEX, lm_loss_sum, lm_metrics, pad, to_device


def packed_documents(inputs: np.ndarray, eos_id: int, device: torch.device) -> dict:
    """{"documents": (B, T) int32, "positions": (B, T)} for packed `inputs` (B, T): a token belongs to the document
    that the next EOS at or after it ends (the model keeps each document's attention to itself); positions restart
    at 0 after each EOS. (B, T) arrays only: the model builds the mask on the device."""
    b, t = inputs.shape
    eos = inputs == eos_id
    documents = np.cumsum(eos, axis=1) - eos  # EOS before each token (the EOS itself stays in its document)
    starts = np.zeros_like(eos)
    starts[:, 0], starts[:, 1:] = True, eos[:, :-1]
    index = np.broadcast_to(np.arange(t), (b, t))
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return to_device(device, documents=documents.astype(np.int32), positions=positions.astype(np.int64))


class CausalLM:
    """Next-token prediction. Samples are token arrays of length <= seq_len + 1; shorter ones are
    right-padded (the padding never reaches a real token's attention because attention is causal).

    `document_mask` (data.document_mask, packed samples): a token attends only to the tokens of its own
    document (a block-diagonal causal mask; a document ends with its EOS), its position counts from its
    document's first token in the window, and an EOS predicts nothing (the next document's first token
    is not its continuation), so each document's logits and loss are those of running it alone."""

    name = "causal_lm"
    eval_keys: tuple[str, ...] = ("loss_sum", "targets")

    def __init__(self, *, pad_id: int, eos_id: int | None = None, document_mask: bool = False, loss_chunk: int = 0,
                 **_):
        self.pad_id, self.eos_id, self.document_mask, self.loss_chunk = pad_id, eos_id, document_mask, loss_chunk

    def collate(self, samples: list[np.ndarray], keys: Sequence[int], device: torch.device) -> dict:
        inputs = pad([s[:-1] for s in samples], self.pad_id)  # (B, T)
        labels = pad([s[1:] for s in samples], IGNORE_INDEX)  # (B, T)
        tokens = int((labels != IGNORE_INDEX).sum())  # non-padding inputs, counted on the host: no device sync
        extra = {}
        if self.document_mask:
            assert self.eos_id is not None  # build_task gives the prepared data's EOS (documents are packed on it)
            labels[inputs == self.eos_id] = IGNORE_INDEX
            extra = packed_documents(inputs, self.eos_id, device)
        targets = int((labels != IGNORE_INDEX).sum())
        return {**to_device(device, input_ids=inputs, labels=labels), **extra, "num_targets": targets, "num_tokens": tokens}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {"documents": batch["documents"], "positions": batch["positions"]} if "documents" in batch else {}
        return lm_loss_sum(model, batch, self.loss_chunk, **inputs)  # document_mask: the documents and positions

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum(model, batch)), "targets": float(batch["num_targets"])}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return lm_metrics(sums)
