"""The objectives by task.name, and building the one a recipe names."""

from __future__ import annotations

from bigtrain.tasks.base import Task
from bigtrain.tasks.causal_lm import CausalLM
from bigtrain.tasks.classification import Classification
from bigtrain.tasks.distill import Distill, DistillClassification
from bigtrain.tasks.masked_lm import MaskedLM
from bigtrain.tasks.sft import SFT


TASKS = {"causal_lm": CausalLM, "masked_lm": MaskedLM, "classification": Classification, "sft": SFT,
         "distill": Distill, "distill_classification": DistillClassification}


def build_task(cfg_task, data, *, seed: int, document_mask: bool = False) -> Task:
    """The task of `cfg_task.name`, given the prepared data's special ids (and label set); `document_mask`:
    data.document_mask (causal_lm)."""
    return TASKS[cfg_task.name](
        pad_id=data.pad_id, eos_id=data.eos_id, mask_id=data.mask_id, vocab_size=data.vocab_size,
        special_ids=data.special_ids, labels=data.labels or (),
        mask_prob=cfg_task.mask_prob, seed=seed, document_mask=document_mask, loss_chunk=cfg_task.loss_chunk_tokens,
        alpha=cfg_task.alpha, temperature=cfg_task.temperature)
