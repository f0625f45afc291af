"""Masked-LM pretraining and fine-tuning (classification, SFT) through the CLI, like a user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

ENCODER = {"arch": "encoder", "preset": "debug", "max_seq_len": 64}
DECODER = {"arch": "decoder", "preset": "debug", "max_seq_len": 64}


def recipe_for(kind: str, cache_dir: Path, runs: Path, **sections) -> dict:
    """Tiny recipes per task: MLM on a stdlib slice, classification and SFT on the docstrings task."""
    base = {
        "masked_lm": {"model": ENCODER, "task": {"name": "masked_lm"}},
        "classification": {"model": ENCODER, "task": {"name": "classification"},
                           "data": {"source": "python-stdlib-docstrings", "max_documents": None, "seq_len": 48,
                                    "validation_split": 0.1},
                           "eval": {"max_samples": None}},
        "sft": {"model": DECODER, "task": {"name": "sft"},
                "data": {"source": "python-stdlib-docstrings", "max_documents": 300, "seq_len": 64,
                         "validation_split": 0.1}},
    }[kind]
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return tiny_recipe(cache_dir, runs, **merged)


def train(tmp_path: Path, cache_dir: Path, kind: str, *overrides: str, name: str | None = None, **sections):
    """Train a tiny recipe of task `kind` (sections override it) under tmp_path/runs/NAME."""
    name = name or kind
    recipe = write_recipe(tmp_path / f"{name}.yaml", recipe_for(kind, cache_dir, tmp_path / "runs", **sections))
    return run_cli("train", str(recipe), f"run.name={name}", *overrides), tmp_path / "runs" / name


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, cache_dir):
    """A debug MLM encoder pretrained once for the fine-tuning tests."""
    tmp = tmp_path_factory.mktemp("mlm")
    result, run_dir = train(tmp, cache_dir, "masked_lm", "train.max_steps=60", "eval.every=30",
                            "data.max_documents=200", "optim.lr=2e-3")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_mlm_run_lowers_loss_and_reports_accuracy(mlm_run):
    records, evals = read_metrics(mlm_run)
    assert sum(r["train/loss"] for r in records[-5:]) / 5 < records[0]["train/loss"] - 0.5  # seen 6.23 → 5.55
    assert [e["step"] for e in evals] == [30, 60]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert 0.0 < evals[-1]["eval/mlm_accuracy"] <= 1.0
    for r in records:  # throughput counts every input token (8 × 32 per step), not just the ~15% targets
        assert r["perf/tokens_per_sec"] * r["perf/step_time_s"] == pytest.approx(8 * 32, rel=1e-6)
    assert (mlm_run / "checkpoints/step-0000060/tokenizer.json").is_file()


def test_classifier_fine_tunes_from_mlm_checkpoint_and_eval_matches(tmp_path, cache_dir, mlm_run):
    result, run_dir = train(tmp_path, cache_dir, "classification", f"model.init_from={mlm_run}",
                            "train.max_steps=40", "eval.every=20", "optim.lr=2e-3")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "init_from.json").read_text())
    assert report["new"] == ["classifier.weight", "classifier.bias"]
    assert "blocks.0.attn.qkv.weight" in report["loaded"] and "tok_emb.weight" in report["loaded"]
    assert any(name.startswith("mlm_head") for name in report["unused"])
    assert "loaded" in result.stderr and "classifier.weight" in result.stderr
    labels = json.loads((run_dir / "labels.json").read_text())
    assert 4 <= len(labels) <= 8 and labels == sorted(labels)
    records, evals = read_metrics(run_dir)
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert {"eval/loss", "eval/accuracy", "eval/f1", "eval/weighted/f1", "eval/micro/f1"} <= evals[-1].keys()
    assert {f"eval/f1/{label}" for label in labels} <= evals[-1].keys()
    assert not any(isinstance(v, (list, dict)) for e in evals for v in e.values())  # matrices only in eval/*.json

    # Each in-training eval wrote its report: the confusion matrix covers the whole validation split (rows = true
    # label in labels.json order) and agrees with the logged accuracy; the console got the table.
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step-0000020.json", "step-0000040.json"]
    report = json.loads((run_dir / "eval/step-0000040.json").read_text())
    matrix = report["confusion_matrix"]
    total = sum(map(sum, matrix))
    assert report["labels"] == labels and len(matrix) == len(labels) and report["checkpoint"] is None
    assert total == len(validation_split(run_dir)) == sum(c["support"] for c in report["per_class"])
    assert sum(matrix[i][i] for i in range(len(labels))) / total == pytest.approx(evals[-1]["eval/accuracy"], rel=1e-12)
    assert {k: v for k, v in report.items() if k.startswith("eval/")} == {k: v for k, v in evals[-1].items() if k != "step"}
    assert "confusion matrix (rows: true label, columns: predicted)" in result.stderr and "weighted avg" in result.stderr

    # `bigtrain eval` of the run gives the same metrics as the final in-training eval, and rewrites the same report.
    evaluated = run_cli("eval", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 40
    for key in evals[-1]:
        assert metrics[key] == pytest.approx(evals[-1][key], rel=1e-9)
    rewritten = json.loads((run_dir / "eval/step-0000040.json").read_text())
    assert rewritten["checkpoint"].endswith("step-0000040")
    assert rewritten["confusion_matrix"] == matrix and rewritten["labels"] == labels
    for ours, theirs in zip(rewritten["per_class"], report["per_class"]):
        assert ours == {k: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v for k, v in theirs.items()}
    assert "weighted avg" in evaluated.stderr
    assert run_cli("eval", str(run_dir), "--checkpoint", "step-7").returncode == 2


def validation_split(run_dir: Path):
    """The validation split the run evaluated on (its own prepared data)."""
    from bigtrain.config import load_config
    from bigtrain.data import load_prepared

    return load_prepared(load_config(run_dir / "config.yaml").data, task="classification").validation


def test_sft_run_from_a_decoder_checkpoint_lowers_loss(tmp_path, cache_dir):
    base, base_dir = train(tmp_path, cache_dir, "sft", "train.max_steps=2", name="base",
                           task={"name": "causal_lm"}, data={"source": "python-stdlib", "max_documents": 60,
                                                             "validation_split": 0.1})
    assert base.returncode == 0, base.stderr
    result, run_dir = train(tmp_path, cache_dir, "sft", f"model.init_from={base_dir}", "train.max_steps=30",
                            "optim.lr=2e-3", "eval.every=15")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "init_from.json").read_text())
    assert report["new"] == [] and report["unused"] == []
    records, evals = read_metrics(run_dir)
    assert sum(r["train/loss"] for r in records[-5:]) / 5 < records[0]["train/loss"] - 0.5
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


@pytest.mark.slow  # three runs in sequence per task
@pytest.mark.parametrize("task", ["masked_lm", "classification", "sft"])
def test_exact_resume_per_task(tmp_path, cache_dir, task):
    common = ("train.max_steps=6", "checkpoint.every=3", "eval.every=3")
    straight, a_dir = train(tmp_path, cache_dir, task, *common, name="straight")
    assert straight.returncode == 0, straight.stderr
    for extra in (("train.stop_at_step=3",), ()):
        part, b_dir = train(tmp_path, cache_dir, task, *common, *extra, name="resumed")
        assert part.returncode == 0, part.stderr
    (a, a_eval), (b, b_eval) = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]  # bit for bit
    assert [e for e in a_eval] == [e for e in b_eval]


def test_bad_task_input_is_one_line_exit_2(tmp_path, cache_dir, mlm_run):
    rows = [{"text": f"example {i}", "label": "x" if i % 2 else "y"} for i in range(20)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    missing, _ = train(tmp_path, cache_dir, "classification", f"data.source={data}", "data.label_column=category",
                       name="missing")
    assert missing.returncode == 2
    assert "category" in missing.stderr.strip().splitlines()[-1] and len(missing.stderr.strip().splitlines()) == 1

    import datasets

    split = tmp_path / "split"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows),
        "validation": datasets.Dataset.from_list([{"text": "odd", "label": "zebra"}]),
    }).save_to_disk(str(split))
    unseen, _ = train(tmp_path, cache_dir, "classification", f"data.source={split}", name="unseen")
    assert unseen.returncode == 2
    assert "zebra" in unseen.stderr.strip().splitlines()[-1]

    foreign, _ = train(tmp_path, cache_dir, "sft", f"model.init_from={mlm_run}", name="foreign")
    assert foreign.returncode == 2
    line = foreign.stderr.strip().splitlines()[-1]
    assert "model.init_from" in line and "encoder" in line and "'mlm_head" in line
