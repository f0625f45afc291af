"""Knowledge distillation (task.name distill / distill_classification) through the CLI, like a user: a student
learns from a trained teacher faster than from the data alone; the loss keeps the global-token contract (the same
losses under accumulation, fsdp and ZeRO-3); a teacher with another tokenizer is a one-line error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_tasks import recipe_for
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

STUDENT = {"preset": "debug", "max_seq_len": 64, "n_layers": 1, "n_heads": 2}  # half the teacher's depth


def run(tmp: Path, recipe: dict, name: str, *overrides: str, nproc: int = 1):
    path = write_recipe(tmp / f"{name}.yaml", recipe)
    args = ("train", str(path), f"run.name={name}", *overrides)
    return (run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args)), tmp / "runs" / name


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cache_dir) -> Path:
    """The tiny causal-LM recipe's debug decoder trained 60 steps (eval loss ~5.40; a student of 20 steps ~5.5)."""
    tmp = tmp_path_factory.mktemp("teacher")
    result, run_dir = run(tmp, tiny_recipe(cache_dir, tmp / "runs"), "teacher", "train.max_steps=60", "eval.every=0")
    assert result.returncode == 0, result.stderr
    return run_dir


def student(cache_dir: Path, tmp: Path, task: dict, **sections) -> dict:
    return tiny_recipe(cache_dir, tmp / "runs", model=STUDENT, task=task, **sections)


def test_distilled_student_beats_the_same_student_trained_from_scratch(tmp_path, cache_dir, teacher):
    steps = {"train": {"max_steps": 20}, "eval": {"every": 10}}
    # Both students read the same data: the distilled one takes the teacher's tokenizer, the other is given it.
    scratch, scratch_dir = run(tmp_path, student(cache_dir, tmp_path, {"name": "causal_lm"}, **steps), "scratch",
                               f"data.tokenizer={teacher / 'tokenizer.json'}")
    assert scratch.returncode == 0, scratch.stderr
    distilled, distill_dir = run(tmp_path, student(cache_dir, tmp_path, {"name": "distill", "teacher": str(teacher)},
                                                   **steps), "distilled")
    assert distilled.returncode == 0, distilled.stderr
    (_, scratch_evals), (_, distill_evals) = read_metrics(scratch_dir), read_metrics(distill_dir)
    print(f"eval/loss after 20 steps: from scratch {scratch_evals[-1]['eval/loss']:.4f}, "
          f"distilled {distill_evals[-1]['eval/loss']:.4f}")  # seen 5.5645 vs 5.5182 (τ 1; τ 2: 5.5194)
    assert [e["step"] for e in distill_evals] == [10, 20]
    assert distill_evals[-1]["eval/loss"] < scratch_evals[-1]["eval/loss"] - 0.02
    assert 0 < distill_evals[-1]["eval/distill_loss"] < distill_evals[0]["eval/distill_loss"]
    assert "task.teacher" in distilled.stderr and "frozen in float32" in distilled.stderr
    # The teacher is not the student's: its checkpoint holds the student's tensors only (the scratch run's names).
    saved = torch.load(next((distill_dir / "checkpoints").iterdir()) / "model.pt", weights_only=True)
    reference = torch.load(next((scratch_dir / "checkpoints").iterdir()) / "model.pt", weights_only=True)
    assert saved.keys() == reference.keys()
    assert all(saved[k].shape == reference[k].shape for k in saved)


@pytest.mark.parametrize("nproc, parallel", [(2, "parallel.strategy=fsdp"),
                                             (2, "parallel.strategy=deepspeed parallel.zero_stage=3")])
def test_distillation_losses_are_the_same_under_accumulation_and_sharding(tmp_path, cache_dir, teacher, nproc,
                                                                          parallel):
    """One process accumulating 2 micro-batches of 4 vs 2 processes of 4 each, the teacher sharded like the
    student: the same global-token-weighted losses."""
    recipe = student(cache_dir, tmp_path, {"name": "distill", "teacher": str(teacher)},
                     train={"max_steps": 4}, eval={"every": 4})
    one, one_dir = run(tmp_path, recipe, "one")
    assert one.returncode == 0, one.stderr
    sharded, sharded_dir = run(tmp_path, recipe, "sharded", *parallel.split(), nproc=nproc)
    assert sharded.returncode == 0, sharded.stderr
    (a, a_eval), (b, b_eval) = read_metrics(one_dir), read_metrics(sharded_dir)
    assert len(a) == len(b) == 4
    for x, y in zip(a + a_eval, b + b_eval):
        for key in ("train/loss", "eval/loss", "eval/distill_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x["step"])


def test_a_teacher_with_another_tokenizer_is_one_line_exit_2(tmp_path, cache_dir, teacher):
    other = write_recipe(tmp_path / "other.yaml", tiny_recipe(cache_dir, tmp_path / "runs", data={"vocab_size": 384}))
    prepared = run_cli("prepare", str(other))
    assert prepared.returncode == 0, prepared.stderr
    folder = re.search(r"^prepared (\S+):", prepared.stdout, re.M).group(1)  # holds its 384-token tokenizer.json
    recipe = student(cache_dir, tmp_path, {"name": "distill", "teacher": str(teacher)},
                     data={"vocab_size": 384, "tokenizer": f"{folder}/tokenizer.json"}, train={"max_steps": 1})
    result, run_dir = run(tmp_path, recipe, "other-tokenizer")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "task.teacher" in lines[-1] and "tokenizer" in lines[-1] and "512 tokens" in lines[-1], lines[-1]
    assert not (run_dir / "checkpoints").exists()


def test_classifier_distills_from_a_classifier_teacher(tmp_path, cache_dir):
    teacher_run, teacher_dir = run(tmp_path, recipe_for("classification", cache_dir, tmp_path / "runs"), "teacher",
                                   "train.max_steps=30", "eval.every=0")
    assert teacher_run.returncode == 0, teacher_run.stderr
    recipe = recipe_for("classification", cache_dir, tmp_path / "runs",
                        model={**STUDENT, "arch": "encoder"},
                        task={"name": "distill_classification", "teacher": str(teacher_dir), "alpha": 0.7})
    result, run_dir = run(tmp_path, recipe, "student", "train.max_steps=6", "eval.every=6")
    assert result.returncode == 0, result.stderr
    records, evals = read_metrics(run_dir)
    assert len(records) == 6 and evals[-1]["step"] == 6
    assert 0 < evals[-1]["eval/distill_loss"] and 0 <= evals[-1]["eval/accuracy"] <= 1


def test_a_hugging_face_teacher_folder_teaches_with_its_own_config_and_tokenizer(tmp_path, cache_dir):
    """task.teacher: an HF GPT-2 folder (its config.json sets the teacher's shape, its tokenizer.json the student's
    data): a distill run with only the teacher term (alpha 1) lowers the KL to it."""
    transformers = pytest.importorskip("transformers")
    from tests.unit.test_interop import hf_folder, train_bpe_file

    folder = hf_folder(tmp_path, "gpt2", tokenizer=train_bpe_file(tmp_path / "tok"))
    recipe = student(cache_dir, tmp_path, {"name": "distill", "teacher": str(folder), "alpha": 1.0},
                     train={"max_steps": 8}, optim={"lr": 1e-2, "warmup_steps": 0})
    result, run_dir = run(tmp_path, recipe, "from-hf")
    assert result.returncode == 0, result.stderr
    n_params = transformers.AutoModelForCausalLM.from_pretrained(folder).num_parameters()
    assert f"task.teacher {folder}: decoder of {n_params / 1e6:.2f}M params, frozen in float32" in result.stderr
    records, _ = read_metrics(run_dir)
    assert records[-1]["train/loss"] < records[0]["train/loss"] - 0.1  # alpha 1: the loss is τ² · KL(teacher ‖ student)
