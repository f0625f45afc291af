"""Training objectives behind one small interface: collate, count targets, summed loss, eval metrics.

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
    def eval_metrics(self, sums: dict[str, float]) -> dict: ...  # eval/… scalars (+ a report: see eval_report.py)


# --------------------------------------------------------------------------- shared pieces


def _pad(rows: list[np.ndarray], value: int, length: int | None = None) -> np.ndarray:
    """Right-pad 1-D arrays into a (B, T) int64 array."""
    length = length or max(len(r) for r in rows)
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _key_padding_mask(lengths: np.ndarray, length: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, 1, T) bool, True where a key is a real token; None when nothing is padded."""
    if (lengths == length).all():
        return None
    mask = np.arange(length)[None, :] < lengths[:, None]
    return torch.from_numpy(mask[:, None, None, :]).to(device)


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _lm_loss_sum(model: nn.Module, batch: dict, loss_chunk: int, **inputs) -> torch.Tensor:
    """Σ token cross-entropy of the next-token logits: from the (B, T, V) logits, or (loss_chunk > 0,
    task.loss_chunk_tokens) computed by the model that many positions at a time, the logits never whole."""
    if loss_chunk:
        return model(batch["input_ids"], labels=batch["labels"], loss_chunk=loss_chunk, **inputs)
    return _token_loss_sum(model(batch["input_ids"], **inputs), batch["labels"])


def _lm_metrics(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["loss_sum"] / max(sums["targets"], 1.0)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}


def _to(device: torch.device, **arrays: np.ndarray) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in arrays.items()}


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
    return _to(device, documents=documents.astype(np.int32), positions=positions.astype(np.int64))


# --------------------------------------------------------------------------- causal LM


class CausalLM:
    """Next-token prediction. Samples are token arrays of length <= seq_len + 1; shorter ones are
    right-padded (the padding never reaches a real token's attention because attention is causal).

    `document_mask` (data.document_mask, packed samples): a token attends only to the tokens of its own
    document (a block-diagonal causal mask; a document ends with its EOS), its position counts from its
    document's first token in the window, and an EOS predicts nothing (the next document's first token
    is not its continuation), so each document's logits and loss are those of running it alone."""

    name = "causal_lm"
    eval_keys = ("loss_sum", "targets")

    def __init__(self, *, pad_id: int, eos_id: int | None = None, document_mask: bool = False, loss_chunk: int = 0,
                 **_):
        self.pad_id, self.eos_id, self.document_mask, self.loss_chunk = pad_id, eos_id, document_mask, loss_chunk

    def collate(self, samples: list[np.ndarray], keys: Sequence[int], device: torch.device) -> dict:
        inputs = _pad([s[:-1] for s in samples], self.pad_id)  # (B, T)
        labels = _pad([s[1:] for s in samples], IGNORE_INDEX)  # (B, T)
        tokens = int((labels != IGNORE_INDEX).sum())  # non-padding inputs, counted on the host: no device sync
        extra = {}
        if self.document_mask:
            labels[inputs == self.eos_id] = IGNORE_INDEX
            extra = packed_documents(inputs, self.eos_id, device)
        targets = int((labels != IGNORE_INDEX).sum())
        return {**_to(device, input_ids=inputs, labels=labels), **extra, "num_targets": targets, "num_tokens": tokens}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {"documents": batch["documents"], "positions": batch["positions"]} if "documents" in batch else {}
        return _lm_loss_sum(model, batch, self.loss_chunk, **inputs)  # document_mask: the documents and positions

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum(model, batch)), "targets": float(batch["num_targets"])}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return _lm_metrics(sums)


# --------------------------------------------------------------------------- masked LM


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
        inputs = _pad([m[0] for m in masked], self.pad_id)  # (B, T)
        labels = _pad([m[1] for m in masked], IGNORE_INDEX)  # (B, T)
        return {**_to(device, input_ids=inputs, labels=labels),
                "attn_mask": _key_padding_mask(lengths, inputs.shape[1], device),
                "num_targets": int((labels != IGNORE_INDEX).sum()), "num_tokens": int(lengths.sum())}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], attn_mask=batch["attn_mask"])  # (B, T, V)

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return _token_loss_sum(self._logits(model, batch), batch["labels"])

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logits, labels = self._logits(model, batch), batch["labels"]
        selected = labels != IGNORE_INDEX
        return {"loss_sum": float(_token_loss_sum(logits, labels)), "targets": float(batch["num_targets"]),
                "correct": float((logits.argmax(-1)[selected] == labels[selected]).sum())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**_lm_metrics(sums), "eval/mlm_accuracy": sums["correct"] / max(sums["targets"], 1.0)}


# --------------------------------------------------------------------------- classification


class Classification:
    """Sequence classification. Samples are {"tokens", "label"}; batches are padded to the longest
    example in the batch (ragged, never packed). The loss is a sum over examples, so the logged loss
    is the example-weighted global mean. Eval: loss and the confusion matrix, summed over ranks as K×K
    flattened counts (exact under any world size), from which classification_scores derives the rest."""

    name = "classification"

    def __init__(self, *, pad_id: int, labels: Sequence, **_):
        self.pad_id = pad_id
        self.labels = list(labels)
        k = len(self.labels)
        self._confusion_keys = tuple(f"confusion_{t}_{p}" for t in range(k) for p in range(k))  # row-major (true, predicted)
        self.eval_keys = ("loss_sum", "targets", *self._confusion_keys)

    def collate(self, samples: list[dict], keys: Sequence[int], device: torch.device) -> dict:
        lengths = np.array([len(s["tokens"]) for s in samples])
        inputs = _pad([s["tokens"] for s in samples], self.pad_id)  # (B, T)
        return {**_to(device, input_ids=inputs, lengths=lengths,
                      labels=np.array([s["label"] for s in samples], dtype=np.int64)),
                "attn_mask": _key_padding_mask(lengths, inputs.shape[1], device),
                "num_targets": len(samples), "num_tokens": int(lengths.sum())}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], attn_mask=batch["attn_mask"], lengths=batch["lengths"])  # (B, K)

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"], reduction="sum")

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logits, labels = self._logits(model, batch).float(), batch["labels"]  # (B, K), (B,)
        k = len(self.labels)
        confusion = torch.bincount(labels * k + logits.argmax(-1), minlength=k * k)  # (K*K,) row-major (true, predicted)
        return {"loss_sum": float(F.cross_entropy(logits, labels, reduction="sum")), "targets": float(len(labels)),
                **dict(zip(self._confusion_keys, map(float, confusion.tolist())))}

    def eval_metrics(self, sums: dict[str, float]) -> dict:
        """eval/loss plus classification_scores: scalars under eval/… and the labels / confusion_matrix /
        per_class report (bigtrain/eval/report.py keeps those out of metrics.jsonl)."""
        k = len(self.labels)
        confusion = np.array([sums[key] for key in self._confusion_keys], dtype=np.int64).reshape(k, k)
        return {"eval/loss": sums["loss_sum"] / max(sums["targets"], 1.0), **classification_scores(confusion, self.labels)}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0.0 where the denominator is 0."""
    out = np.zeros(np.shape(numerator), dtype=np.float64)
    return np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)


def classification_scores(confusion: np.ndarray, labels: Sequence) -> dict:
    """Accuracy and precision / recall / F1 from a (K, K) confusion matrix (rows = true label, columns =
    predicted, label-id order), equal to scikit-learn's on the same predictions with its defaults:

    - a 0/0 ratio is 0.0 (sklearn's zero_division="warn" gives 0.0; nothing is warned here);
    - per class (`per_class`, `eval/f1/<label>`): every label, as sklearn's labels=range(K);
    - `eval/f1` and `eval/macro/*`: unweighted mean over the labels that occur in the truth or the predictions
      (sklearn's default labels=None); `eval/weighted/*`: weighted by support; `eval/micro/*`: from the summed
      counts (equal to accuracy for single-label data);
    - binary tasks (K = 2): `eval/positive/*` is label id 1's, as sklearn's average="binary", pos_label=1.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp, predicted, support = np.diag(confusion), confusion.sum(0), confusion.sum(1)  # each (K,)
    precision, recall, f1 = _ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, predicted + support)
    total, present = int(support.sum()), (predicted + support) > 0
    scores = {"eval/accuracy": float(_ratio(tp.sum(), total)),
              "eval/f1": float(f1[present].mean()) if present.any() else 0.0}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        scores[f"eval/macro/{name}"] = float(values[present].mean()) if present.any() else 0.0
        scores[f"eval/weighted/{name}"] = float(_ratio((values * support).sum(), total))
        scores[f"eval/micro/{name}"] = scores["eval/accuracy"]  # Σtp / Σpredicted = Σtp / Σsupport = Σtp / N
    if len(labels) == 2:
        scores.update({"eval/positive/precision": float(precision[1]), "eval/positive/recall": float(recall[1]),
                       "eval/positive/f1": float(f1[1])})
    scores.update({f"eval/f1/{label}": float(f1[i]) for i, label in enumerate(labels)})
    scores["labels"] = list(labels)
    scores["confusion_matrix"] = confusion.tolist()
    scores["per_class"] = [{"label": label, "precision": float(precision[i]), "recall": float(recall[i]),
                            "f1": float(f1[i]), "support": int(support[i])} for i, label in enumerate(labels)]
    return scores


# --------------------------------------------------------------------------- supervised fine-tuning


class SFT:
    """Prompt → response fine-tuning of a decoder: loss on response tokens (and the closing EOS) only.
    Samples are {"tokens", "loss_mask", "segments"}; several examples packed into one sample attend
    only inside their own example (block-diagonal causal mask)."""

    name = "sft"
    eval_keys = ("loss_sum", "targets")

    def __init__(self, *, pad_id: int, loss_chunk: int = 0, **_):
        self.pad_id, self.loss_chunk = pad_id, loss_chunk

    def collate(self, samples: list[dict], keys: Sequence[int], device: torch.device) -> dict:
        inputs = _pad([s["tokens"][:-1] for s in samples], self.pad_id)  # (B, T)
        # A target is a response token (or the closing EOS) of the same example as its input position.
        labels = _pad([np.where(s["loss_mask"][1:] & (s["segments"][1:] == s["segments"][:-1]), s["tokens"][1:],
                                IGNORE_INDEX) for s in samples], IGNORE_INDEX)
        attn_mask = None
        if any(s["segments"][-1] > 0 for s in samples):  # packed: keep attention inside each example
            segments = _pad([s["segments"][:-1] for s in samples], -1)  # (B, T); padding is its own segment
            t = segments.shape[1]
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            attn_mask = torch.from_numpy((same & np.tri(t, dtype=bool))[:, None]).to(device)  # (B, 1, T, T)
        return {**_to(device, input_ids=inputs, labels=labels), "attn_mask": attn_mask,
                "num_targets": int((labels != IGNORE_INDEX).sum()),
                "num_tokens": sum(len(s["tokens"]) - 1 for s in samples)}

    def count_targets(self, batch: dict) -> int:
        return batch["num_targets"]

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return _lm_loss_sum(model, batch, self.loss_chunk, attn_mask=batch["attn_mask"])

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum(model, batch)), "targets": float(batch["num_targets"])}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return _lm_metrics(sums)


# --------------------------------------------------------------------------- knowledge distillation


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

    teacher = None

    def _init_distill(self, alpha: float, temperature: float, classes: int) -> None:
        self.alpha, self.temperature, self.classes = alpha, temperature, classes

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
        return self.teacher(batch["input_ids"])

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._distill_sum(model(batch["input_ids"]), batch)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        logits = model(batch["input_ids"])
        return {"loss_sum": float(_token_loss_sum(logits, batch["labels"])), "targets": float(batch["num_targets"]),
                "distill_sum": float(self._distill_sum(logits, batch))}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {**_lm_metrics(sums), "eval/distill_loss": sums["distill_sum"] / max(sums["targets"], 1.0)}


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
        return self._logits(self.teacher, batch)

    def loss_sum(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._distill_sum(self._logits(model, batch), batch)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, float]:
        sums = super().eval_sums(model, batch)
        return {**sums, "distill_sum": float(self._distill_sum(self._logits(model, batch), batch))}

    def eval_metrics(self, sums: dict) -> dict:
        return {**super().eval_metrics(sums), "eval/distill_loss": sums["distill_sum"] / max(sums["targets"], 1.0)}


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
