"""classification: one label per sequence; eval as a confusion matrix summed over ranks, scored like scikit-learn."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.tasks.base import key_padding_mask, pad, to_device


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
        inputs = pad([s["tokens"] for s in samples], self.pad_id)  # (B, T)
        return {**to_device(device, input_ids=inputs, lengths=lengths,
                      labels=np.array([s["label"] for s in samples], dtype=np.int64)),
                "attn_mask": key_padding_mask(lengths, inputs.shape[1], device),
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


def _ratio(numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> np.ndarray:
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
    scores: dict[str, Any] = {"eval/accuracy": float(_ratio(tp.sum(), total)),
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
