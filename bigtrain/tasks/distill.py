"""distill / distill_classification: a student learns a frozen teacher's distribution (task.teacher: teacher.py)
beside the data's targets."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.tasks.base import IGNORE_INDEX, lm_metrics, token_loss_sum
from bigtrain.tasks.causal_lm import CausalLM
from bigtrain.tasks.classification import Classification


def distillation_loss_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                          temperature: float, classes: int) -> torch.Tensor:
    """Σ over the targets (labels != IGNORE_INDEX) of

        alpha · τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ)) + (1 − alpha) · cross-entropy(student, label)

    student, teacher: logits (…, C) of the same positions; labels (…). The KL runs over the first `classes`
    logits (the tokenizer's tokens: an embedding padded to a multiple of 64, or a teacher's larger table, has
    rows no token uses); τ² keeps its gradient's size independent of τ (Hinton et al., 2015). A masked sum, so
    no host sync."""
    tau = float(temperature)
    ce = F.cross_entropy(student.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if alpha == 0:
        return ce
    log_s = F.log_softmax(student[..., :classes].float() / tau, dim=-1)
    log_t = F.log_softmax(teacher[..., :classes].float() / tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (…): one KL per position
    kl_sum = torch.where(labels != IGNORE_INDEX, kl, 0.0).sum()
    return alpha * tau * tau * kl_sum + (1 - alpha) * ce


class _Distilling:
    """The distillation half of Distill / DistillClassification: `teacher` (set by run.py once built: frozen,
    in the compute dtype, sharded like the student) gives the soft targets; `_logits` is the student task's."""

    teacher: nn.Module | None = None

    def _init_distill(self, alpha: float, temperature: float, classes: int) -> None:
        self.alpha, self.temperature, self.classes = alpha, temperature, classes

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits for the batch's positions (Distill, DistillClassification)."""
        raise NotImplementedError

    def _distill_sum(self, student: torch.Tensor, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            teacher = self._teacher_logits(batch)
        return distillation_loss_sum(student, teacher, batch["labels"], alpha=self.alpha,
                                     temperature=self.temperature, classes=self.classes)


class Distill(_Distilling, CausalLM):
    """Causal-LM distillation: the student's next-token distribution learns the teacher's (task.alpha,
    task.temperature) beside the data's next tokens; targets are CausalLM's. Eval: eval/loss is the student's
    cross-entropy with the data (comparable with a run trained without a teacher), eval/distill_loss the
    objective trained on."""

    name = "distill"
    eval_keys = ("loss_sum", "targets", "distill_sum")

    def __init__(self, *, alpha: float, temperature: float, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self._init_distill(alpha, temperature, vocab_size)

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        assert self.teacher is not None  # set by run.py before the first batch
        return self.teacher(batch["input_ids"])

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._distill_sum(model(batch["input_ids"]), batch)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logits = model(batch["input_ids"])
        return {"loss_sum": float(token_loss_sum(logits, batch["labels"])), "targets": float(batch["num_targets"]),
                "distill_sum": float(self._distill_sum(logits, batch))}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**lm_metrics(sums), "eval/distill_loss": sums["distill_sum"] / max(sums["targets"], 1.0)}


class DistillClassification(_Distilling, Classification):
    """Classifier distillation: the student's label distribution learns a classifier teacher's (same labels)
    beside the data's labels; one target per example. Eval: Classification's metrics (eval/loss the student's
    cross-entropy) plus eval/distill_loss."""

    name = "distill_classification"

    def __init__(self, *, alpha: float, temperature: float, labels: Sequence, **kwargs):
        super().__init__(labels=labels, **kwargs)
        self._init_distill(alpha, temperature, len(self.labels))
        self.eval_keys = (*self.eval_keys, "distill_sum")

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        assert self.teacher is not None  # set by run.py before the first batch
        return self._logits(self.teacher, batch)

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._distill_sum(self._logits(model, batch), batch)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        sums = super().eval_sums(model, batch)
        return {**sums, "distill_sum": float(self._distill_sum(self._logits(model, batch), batch))}

    def eval_metrics(self, sums: dict) -> dict:
        return {**super().eval_metrics(sums), "eval/distill_loss": sums["distill_sum"] / max(sums["targets"], 1.0)}
