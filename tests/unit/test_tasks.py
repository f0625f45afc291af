"""Task collate/loss/metrics (bigtrain/tasks/) on hand-made samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigtrain.tasks import IGNORE_INDEX, SFT, CausalLM, Classification, MaskedLM

CPU = torch.device("cpu")


def mlm(**kw) -> MaskedLM:
    return MaskedLM(**{"pad_id": 1, "mask_id": 2, "vocab_size": 1000, "special_ids": (0, 1, 2, 3, 4),
                       "mask_prob": 0.15, "seed": 0, **kw})


def test_mlm_masking_statistics():
    task = mlm()
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 1000, size=(400, 257))
    tokens[:, ::50] = 0  # special tokens are never selected
    selected = replaced_by_mask = replaced_random = kept = eligible = 0
    for key, row in enumerate(tokens):
        inputs, labels = task.mask(row, key)
        sel = labels != IGNORE_INDEX
        assert not sel[row == 0].any()
        eligible += int((row != 0).sum())
        selected += int(sel.sum())
        replaced_by_mask += int((inputs[sel] == 2).sum())
        kept += int((inputs[sel] == row[sel]).sum())
        replaced_random += int(((inputs[sel] != 2) & (inputs[sel] != row[sel])).sum())
    p = selected / eligible
    n = eligible
    assert abs(p - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)  # ≈15% of non-special tokens
    for observed, expected in ((replaced_by_mask, 0.8), (replaced_random, 0.1), (kept, 0.1)):
        # a random replacement can draw the original token (p = 1/1000): counted as kept
        assert abs(observed / selected - expected) < 4 * math.sqrt(expected * (1 - expected) / selected) + 0.002


def test_mlm_masks_depend_only_on_seed_and_key():
    task = mlm()
    row = np.arange(5, 300)
    a, b = task.mask(row, 17), task.mask(row, 17)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(task.mask(row, 18)[1], a[1])
    assert not np.array_equal(mlm(seed=1).mask(row, 17)[1], a[1])
    batch = task.collate([np.arange(5, 40), np.arange(5, 30)], [17, 18], CPU)
    assert batch["attn_mask"].shape == (2, 1, 1, 34) and not batch["attn_mask"][1, 0, 0, 24:].any()
    assert batch["num_targets"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_causal_collate_pads_with_ignored_labels():
    batch = CausalLM(pad_id=9).collate([np.array([1, 2, 3, 4]), np.array([5, 6])], [0, 1], CPU)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 9, 9]]
    assert batch["labels"].tolist() == [[2, 3, 4], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["num_targets"] == 4


def test_sft_labels_only_response_and_packed_attention_stays_inside_each_pair():
    # two packed pairs: [p p r r e] [p r e]; loss_mask marks the tokens to predict (response + eos)
    sample = {"tokens": np.array([10, 11, 12, 13, 0, 20, 21, 0]),
              "loss_mask": np.array([0, 0, 1, 1, 1, 0, 1, 1], dtype=bool),
              "segments": np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=np.int32)}
    batch = SFT(pad_id=1).collate([sample], [0], CPU)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, 0, IGNORE_INDEX, 21, 0]]
    mask = batch["attn_mask"][0, 0]
    assert mask[4, :5].all() and not mask[5, :5].any() and mask[6, 5:7].all()  # pair 2 can't see pair 1
    assert not mask[0, 1]  # causal
    single = dict(sample, segments=np.zeros(8, dtype=np.int32))
    assert SFT(pad_id=1).collate([single], [0], CPU)["attn_mask"] is None


def classification_sums(task: Classification, labels: list[int], predicted: list[int], batch_size: int = 3) -> dict:
    """The task's eval sums over batches of (label, predicted) pairs, from a stand-in model whose logits
    pick `predicted` — as evaluate() adds them up."""
    sums = dict.fromkeys(task.eval_keys, 0.0)
    for start in range(0, len(labels), batch_size):
        logits = torch.nn.functional.one_hot(torch.tensor(predicted[start:start + batch_size]), len(task.labels)).float()
        batch = {"input_ids": None, "attn_mask": None, "lengths": None,
                 "labels": torch.tensor(labels[start:start + batch_size])}
        for key, value in task.eval_sums(lambda ids, attn_mask, lengths: logits, batch).items():
            sums[key] += value
    return sums


def test_classification_metrics_accuracy_and_macro_f1():
    task = Classification(pad_id=0, labels=["a", "b", "c"])
    # labels → predictions: a→a, a→b, b→b, c→b
    metrics = task.eval_metrics(classification_sums(task, [0, 0, 1, 2], [0, 1, 1, 1]))
    assert metrics["eval/accuracy"] == 0.5
    # f1: a = 2/(2+0+1) , b = 2/(2+2+0), c = 0
    assert metrics["eval/f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # rows: true label
    assert metrics["labels"] == ["a", "b", "c"] and "eval/positive/f1" not in metrics
    batch = task.collate([{"tokens": np.array([3, 4, 5]), "label": 2}, {"tokens": np.array([3]), "label": 0}], [0, 1], CPU)
    assert batch["lengths"].tolist() == [3, 1] and batch["labels"].tolist() == [2, 0] and batch["num_targets"] == 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn's UndefinedMetricWarning: its default 0/0 → 0.0
@pytest.mark.parametrize("case", ["multiclass", "binary"])
def test_classification_report_equals_scikit_learn(case):
    """Per-class, macro / micro / weighted and positive-class scores and the confusion matrix equal scikit-learn's
    on the same predictions: with a class that is never predicted (its precision is 0/0 → 0) and, in the
    multi-class case, a label in neither truth nor predictions (per-class zeros, left out of the macro mean)."""
    metrics_lib = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    if case == "multiclass":
        names, n = ["bird", "cat", "dog", "eel", "fox"], 41
        y_true = rng.choice([0, 1, 2, 4], n, p=[0.4, 0.3, 0.2, 0.1])  # eel (3) never occurs
        y_pred = np.where((rng.random(n) < 0.6) & (y_true != 4), y_true, rng.choice([0, 1, 2], n))  # no eel, fox
    else:
        names, n = ["neg", "pos"], 29
        y_true = rng.integers(0, 2, n)
        y_pred = np.where(rng.random(n) < 0.7, y_true, 1 - y_true)
    task = Classification(pad_id=0, labels=names)
    m = task.eval_metrics(classification_sums(task, y_true.tolist(), y_pred.tolist(), batch_size=4))

    k = len(names)
    assert m["confusion_matrix"] == metrics_lib.confusion_matrix(y_true, y_pred, labels=range(k)).tolist()
    assert m["eval/accuracy"] == pytest.approx(metrics_lib.accuracy_score(y_true, y_pred), abs=1e-12)
    p, r, f, s = metrics_lib.precision_recall_fscore_support(y_true, y_pred, labels=range(k))
    assert [c["label"] for c in m["per_class"]] == names
    for name, ours in (("precision", p), ("recall", r), ("f1", f), ("support", s)):
        np.testing.assert_allclose([c[name] for c in m["per_class"]], ours, atol=1e-12, err_msg=name)
    np.testing.assert_allclose([m[f"eval/f1/{label}"] for label in names], f, atol=1e-12)
    for average in ("macro", "micro", "weighted"):
        expected = metrics_lib.precision_recall_fscore_support(y_true, y_pred, average=average)[:3]
        ours = [m[f"eval/{average}/{name}"] for name in ("precision", "recall", "f1")]
        np.testing.assert_allclose(ours, expected, atol=1e-12, err_msg=average)
    assert m["eval/f1"] == pytest.approx(metrics_lib.f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    if case == "binary":
        expected = metrics_lib.precision_recall_fscore_support(y_true, y_pred, average="binary", pos_label=1)[:3]
        ours = [m[f"eval/positive/{name}"] for name in ("precision", "recall", "f1")]
        np.testing.assert_allclose(ours, expected, atol=1e-12)
    else:
        assert m["per_class"][3] == {"label": "eel", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        assert "eval/positive/f1" not in m
        assert m["per_class"][4]["support"] > 0 and sum(row[4] for row in m["confusion_matrix"]) == 0  # fox: unpredicted


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_document_mask_gives_each_packed_document_its_own_logits_and_loss(position):
    """A packed window of three documents (the last cut by the window): with data.document_mask each document's
    logits are those of running it alone, and the loss is the sum of the per-document losses (an EOS predicts
    nothing)."""
    from bigtrain.config import ModelConfig
    from bigtrain.models import build_model
    from bigtrain.models.attention import document_attention

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", max_seq_len=32, position=position), 50).eval()
    eos, pad = 0, 1
    a, b, c = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    window = np.array(a + [eos] + b + [eos] + c)  # (T + 1,)
    task = CausalLM(pad_id=pad, eos_id=eos, document_mask=True)
    batch = task.collate([window], [0], torch.device("cpu"))
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert batch["num_targets"] == 8 and batch["num_tokens"] == 10  # the two EOS inputs predict nothing
    with torch.no_grad():
        packed = model(batch["input_ids"], documents=batch["documents"], positions=batch["positions"])[0]
        # The FlexAttention path (what CUDA runs; CPU flex is forward-only, eager) gives the same logits.
        flex = model(batch["input_ids"], attn_mask=document_attention(batch["documents"], flex=True),
                     positions=batch["positions"])[0]
        torch.testing.assert_close(flex, packed, rtol=1e-5, atol=1e-5)
        loss = task.loss_sum(model, batch)
        alone_loss = torch.zeros(())
        for start, doc in ((0, a + [eos]), (4, b + [eos]), (7, c)):
            ids = torch.tensor([doc[:-1]])
            alone = model(ids)[0]
            torch.testing.assert_close(packed[start:start + len(doc) - 1], alone, rtol=1e-5, atol=1e-5)
            alone_loss += torch.nn.functional.cross_entropy(alone, torch.tensor(doc[1:]), reduction="sum")
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-5)
    plain = CausalLM(pad_id=pad).collate([window], [0], torch.device("cpu"))
    assert plain["num_targets"] == 10 and "documents" not in plain


@pytest.mark.parametrize("task_name", ["causal_lm", "sft"])
def test_chunked_loss_equals_the_whole_logits_loss_and_gradients(task_name):
    """task.loss_chunk_tokens: the loss computed 8 positions at a time (37 positions: a short last chunk), each
    chunk's logits recomputed in backward, equals the loss of the whole (B, T, V) logits, and so do the gradients
    of every parameter (fp32, within 1e-6)."""
    from bigtrain.config import ModelConfig
    from bigtrain.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", max_seq_len=64, tie_embeddings=False), 1000)
    rng = np.random.default_rng(0)
    if task_name == "causal_lm":
        samples = [rng.integers(2, 1000, 38) for _ in range(3)]
        make = lambda chunk: CausalLM(pad_id=1, loss_chunk=chunk)  # noqa: E731
    else:
        samples = [{"tokens": rng.integers(2, 1000, 38), "loss_mask": rng.random(38) < 0.5,
                    "segments": np.repeat([0, 1], 19).astype(np.int32)} for _ in range(3)]
        make = lambda chunk: SFT(pad_id=1, loss_chunk=chunk)  # noqa: E731
    results = []
    for chunk in (0, 8):
        task = make(chunk)
        batch = task.collate(samples, range(3), torch.device("cpu"))
        model.zero_grad()
        loss = task.loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def _kl_reference(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) at temperature tau per row, in float64 from the definition."""
    p = torch.softmax(teacher.double() / tau, -1)
    return (p * (p.log() - torch.log_softmax(student.double() / tau, -1))).sum(-1)


@pytest.mark.parametrize("alpha, tau", [(0.5, 2.0), (1.0, 1.0), (0.0, 3.0), (0.3, 0.5)])
def test_distillation_loss_is_the_weighted_sum_of_kl_and_cross_entropy_over_targets(alpha, tau):
    from bigtrain.tasks import distillation_loss_sum

    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 12, generator=g, requires_grad=True)  # 12 logits: 10 tokens + 2 padded rows
    teacher = torch.randn(2, 5, 12, generator=g) * 3
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4, 5], [9, IGNORE_INDEX, IGNORE_INDEX, 0, 3]])
    got = distillation_loss_sum(student, teacher, labels, alpha=alpha, temperature=tau, classes=10)
    keep = labels != IGNORE_INDEX
    kl = _kl_reference(student[..., :10], teacher[..., :10], tau)[keep].sum()
    ce = torch.nn.functional.cross_entropy(student.double()[keep], labels[keep], reduction="sum")
    assert got.item() == pytest.approx((alpha * tau * tau * kl + (1 - alpha) * ce).item(), rel=1e-6)
    # A target's term depends only on its own logits: the padded vocabulary rows and ignored positions add nothing
    # to the KL, and a sum over micro-batches is the sum over the whole batch (the loop divides by the global count).
    halves = sum(distillation_loss_sum(student[i:i + 1], teacher[i:i + 1], labels[i:i + 1], alpha=alpha,
                                       temperature=tau, classes=10) for i in range(2))
    assert halves.item() == pytest.approx(got.item(), rel=1e-6)
    got.backward()
    assert student.grad[~keep].abs().max() == 0  # ignored positions get no gradient


def test_distill_classification_loss_uses_the_classifier_logits():
    from bigtrain.tasks import DistillClassification

    task = DistillClassification(pad_id=0, labels=["a", "b", "c"], alpha=0.5, temperature=2.0)
    g = torch.Generator().manual_seed(1)
    student_logits, teacher_logits = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    batch = task.collate([{"tokens": np.array([5, 6, 7]), "label": i % 3} for i in range(4)], range(4), CPU)

    def model_giving(logits):
        return lambda input_ids, attn_mask=None, lengths=None: logits

    task.teacher = model_giving(teacher_logits)
    got = task.loss_sum(model_giving(student_logits), batch)
    kl = _kl_reference(student_logits, teacher_logits, 2.0).sum()
    ce = torch.nn.functional.cross_entropy(student_logits.double(), batch["labels"], reduction="sum")
    assert got.item() == pytest.approx((0.5 * 4 * kl + 0.5 * ce).item(), rel=1e-6)
    sums = task.eval_sums(model_giving(student_logits), batch)
    metrics = task.eval_metrics(sums)
    assert metrics["eval/loss"] == pytest.approx(ce.item() / 4, rel=1e-6)  # the student's own cross-entropy
    assert metrics["eval/distill_loss"] == pytest.approx(got.item() / 4, rel=1e-6)
