"""`bigtrain eval RUN --tasks` (bigtrain/eval/lm_eval.py): on a trained debug decoder, two custom lm-eval
tasks from local jsonl (multiple choice; loglikelihood with an empty and an over-long context) score as
lm-eval's own `hf` backend scores them on the `bigtrain export --format hf` folder (each sample's
log-likelihood within 1e-4, acc / acc_norm / perplexity equal); the report file and table; one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from bigtrain.cli import main  # noqa: E402
from tests.conftest import REPO, run_cli, run_torchrun, tiny_recipe, write_recipe  # noqa: E402

MC_DOCS = [
    {"context": "def __init__(self", "choices": ["):", " = 1", "import os", "while"], "label": 0},
    {"context": "import", "choices": [" os", " ((((", "]]]", " = = ="], "label": 0},
    {"context": "for i in", "choices": [" range(n):", " return", "):", " import"], "label": 0},
    {"context": "    return self.", "choices": ["_data", "((", " def", "import sys"], "label": 0},
    {"context": "if x is None:\n   ", "choices": [" return", " class", ")", " else:"], "label": 1},
]
LL_DOCS = [
    {"context": "def f(x):\n    return", "continuation": " x"},
    {"context": "", "continuation": "import os"},  # empty context: the prefix (BOS or EOS) token is the context
    {"context": "class A:\n    def __init__(self):\n        self.x = 1\n" * 6, "continuation": "        return None"},
]


def task_yaml(name: str, data: Path, cache: Path, output_type: str, fields: dict, metrics: list[str]) -> str:
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
             f"  cache_dir: {cache}", "test_split: test", f"output_type: {output_type}"]
    lines += [f'{key}: "{value}"' for key, value in fields.items()]
    lines += ["metric_list:", *(f"  - metric: {m}" for m in metrics)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    cache = tmp_path_factory.mktemp("datasets-cache")
    for name, docs in (("mc", MC_DOCS), ("ll", LL_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "bt_mc.yaml").write_text(task_yaml(
        "bt_mc", folder / "mc.jsonl", cache, "multiple_choice",
        {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
         "target_delimiter": ""}, ["acc", "acc_norm"]))
    (folder / "bt_ll.yaml").write_text(task_yaml(
        "bt_ll", folder / "ll.jsonl", cache, "loglikelihood",
        {"doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}", "target_delimiter": ""},
        ["perplexity", "acc"]))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> tuple[Path, Path]:
    """A debug decoder trained 12 steps (run dir) and its `bigtrain export --format hf` folder."""
    tmp = tmp_path_factory.mktemp("lm-eval-run")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_recipe(cache_dir, tmp / "runs", train={"max_steps": 12}))
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp / "runs" / "tiny"
    result = run_cli("export", str(run_dir), str(tmp / "hf"), "--format", "hf")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir, tmp / "hf"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document (doc_id order), each request's log-likelihood."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]


def test_scores_equal_lm_evals_hf_backend_on_the_exported_folder(trained, tasks_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bigtrain.eval.generator import load_generator
    from bigtrain.eval.lm_eval import run_lm_eval, task_scores

    run_dir, hf = trained
    tasks, manager = ["bt_mc", "bt_ll"], TaskManager(include_path=str(tasks_dir))
    ours = run_lm_eval(load_generator(run_dir), tasks, manager, batch_size=3, log_samples=True)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf), "device": "cpu", "dtype": "float32"}, tasks=tasks,
        batch_size=4, task_manager=manager, log_samples=True, bootstrap_iters=0)
    for task in tasks:
        a, b = loglikelihoods(ours, task), loglikelihoods(theirs, task)
        assert [len(row) for row in a] == [len(row) for row in b]
        assert all(abs(x - y) < 1e-4 for ra, rb in zip(a, b) for x, y in zip(ra, rb)), (a, b)
    assert len(loglikelihoods(ours, "bt_mc")) == len(MC_DOCS) and all(len(r) == 4 for r in loglikelihoods(ours, "bt_mc"))
    ours_scores, their_scores = task_scores(ours), task_scores(theirs)
    assert ours_scores["bt_mc"]["acc"] == their_scores["bt_mc"]["acc"]
    assert ours_scores["bt_mc"]["acc_norm"] == their_scores["bt_mc"]["acc_norm"]
    assert ours_scores["bt_ll"]["acc"] == their_scores["bt_ll"]["acc"]
    assert ours_scores["bt_ll"]["perplexity"] == pytest.approx(their_scores["bt_ll"]["perplexity"], rel=1e-4)
    # the trained model ranks: it prefers Python to noise (not all answers equal, so the comparison means something)
    assert ours_scores["bt_mc"]["acc"] >= 0.4


def test_eval_tasks_writes_the_report_and_prints_a_table(trained, tasks_dir, capsys):
    run_dir, _ = trained
    assert main(["eval", str(run_dir), "--tasks", "bt_mc", "--include-path", str(tasks_dir), "--limit", "3",
                 "--num-fewshot", "1"]) == 0
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    report = json.loads((run_dir / "eval" / "lm-eval-step-0000012.json").read_text())
    assert report["step"] == line["step"] == 12 and report["checkpoint"].endswith("step-0000012")
    assert set(report["tasks"]["bt_mc"]) >= {"acc", "acc_norm"} and report["tasks"] == line["tasks"]
    assert report["lm_eval"]["limit"] == 3 and report["lm_eval"]["num_fewshot"] == 1
    assert report["lm_eval"]["n-shot"]["bt_mc"] == 1 and report["lm_eval"]["n-samples"]["bt_mc"]["effective"] == 3
    assert "bt_mc" in err and "acc_norm" in err


@pytest.mark.slow
def test_eval_tasks_in_the_loop_split_over_fsdp_ranks_score_as_bigtrain_eval_does(tmp_path, cache_dir, tasks_dir):
    """eval.tasks at each eval of a 2-rank FSDP run: each rank scores a share of the documents (5 and 3 documents
    split 3 + 2 and 2 + 1, so one rank pads its forwards: FSDP's forward is collective), rank 0 gathers. The
    scores equal `bigtrain eval --tasks` on the checkpoint of that step in one process; they go to metrics.jsonl
    and RUN/eval/lm-eval-step-N.json."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2},
        eval={"every": 2, "max_samples": 8, "tasks": ["bt_mc", "bt_ll"], "tasks_include_path": str(tasks_dir)},
        checkpoint={"every": 2, "keep_last": 0}, parallel={"strategy": "fsdp"}))
    result = run_torchrun(2, "train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    logged = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "lm_eval/bt_mc/acc" in r}
    assert sorted(logged) == [2, 4]
    reports = {step: json.loads((run_dir / "eval" / f"lm-eval-step-{step:07d}.json").read_text()) for step in (2, 4)}
    for step, report in reports.items():
        assert report["lm_eval"]["n-samples"]["bt_mc"]["effective"] == len(MC_DOCS)
        assert logged[step]["lm_eval/bt_mc/acc"] == report["tasks"]["bt_mc"]["acc"]
        assert logged[step]["lm_eval/bt_ll/perplexity"] == report["tasks"]["bt_ll"]["perplexity"]
    assert reports[2]["tasks"]["bt_ll"] != reports[4]["tasks"]["bt_ll"]  # scored on the model of each step
    alone = run_cli("eval", str(run_dir), "--tasks", "bt_mc,bt_ll", "--include-path", str(tasks_dir))  # step 4
    assert alone.returncode == 0, alone.stderr[-2000:]
    theirs = json.loads(alone.stdout.strip().splitlines()[-1])["tasks"]
    for task in ("bt_mc", "bt_ll"):
        assert reports[4]["tasks"][task] == pytest.approx(theirs[task], rel=1e-4), task
    assert "bt_ll" in result.stderr and "perplexity" in result.stderr  # the table on the console


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bigtrain: error:"), err
    return err[0]


def test_unknown_task_is_a_one_line_error(trained, tasks_dir, capsys):
    run_dir, _ = trained
    assert main(["eval", str(run_dir), "--tasks", "bt_mc", "--include-path", str(tasks_dir / "nope")]) == 2
    assert "--include-path" in one_error_line(capsys)
    assert main(["eval", str(run_dir), "--tasks", "bt_mc,no_such_task", "--include-path", str(tasks_dir)]) == 2
    assert "'no_such_task'" in one_error_line(capsys)
    assert main(["eval", str(run_dir), "--limit", "3"]) == 2  # an lm-eval flag without --tasks
    assert "--tasks" in one_error_line(capsys)


def test_missing_lm_eval_names_the_extra(trained, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "bigtrain.eval.lm_eval", raising=False)
    assert main(["eval", str(trained[0]), "--tasks", "hellaswag"]) == 2
    assert "pip install 'bigtrain[eval]'" in one_error_line(capsys)


def test_scores_go_to_the_runs_wandb_run_at_the_checkpoints_step(tmp_path, monkeypatch):
    """A recipe logging to wandb: the scores go to its run (the checkpoint's wandb id) as lm_eval/<task>/<metric>;
    metrics.jsonl is left alone."""
    import wandb

    from bigtrain.cli.evaluate import _log_lm_eval_to_wandb

    calls = []

    class FakeRun:
        id = "run-123"

        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def fake_init(**kwargs):
        calls.append(("init", kwargs["id"], kwargs["resume"]))
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    folder = tmp_path / "run" / "checkpoints" / "step-0000007"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("run:\n  name: r\nlogging:\n  wandb: offline\n")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 9}\n')
    _log_lm_eval_to_wandb(tmp_path / "run", folder, 7, "run-123", {"bt_mc": {"acc": 0.5, "acc_norm": 0.25}})
    assert calls == [("init", "run-123", "allow"), ("log", {"lm_eval/bt_mc/acc": 0.5, "lm_eval/bt_mc/acc_norm": 0.25}, 7),
                     ("finish",)]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 9}\n'
    calls.clear()
    (folder / "config.yaml").write_text("run:\n  name: r\n")  # wandb disabled (the default): nothing
    _log_lm_eval_to_wandb(tmp_path / "run", folder, 7, None, {"bt_mc": {"acc": 0.5}})
    assert calls == []


@pytest.mark.slow
def test_sigterm_during_eval_tasks_in_the_loop_abandons_them_and_checkpoints_the_step(tmp_path, cache_dir, tasks_dir):
    """A signal while lm-eval scores in the loop (each forward slowed to 1 s by tests/integration/faulty.py) stops
    the scoring at the next forward; the step is checkpointed, its eval is not logged, and the exit is 75."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 4},
        eval={"every": 2, "max_samples": 8, "tasks": ["bt_mc", "bt_ll"], "tasks_include_path": str(tasks_dir)}))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           "BIGTRAIN_FAULT": "slow_tasks:rank=0:step=2:seconds=1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/integration/faulty.py"), "train", str(recipe)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("faulty: "):
                break
        time.sleep(2)  # a forward or two into the tasks
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        err = "".join(lines) + proc.stderr.read()
        assert proc.wait(timeout=60) == 75, err[-3000:]
        took_s = time.monotonic() - sent
    finally:
        proc.kill()
    assert took_s < 10, err[-3000:]
    assert "bigtrain: preempted by SIGTERM at step 2; checkpoint saved" in err
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000002"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert not [r for r in records if "eval/loss" in r or any(k.startswith("lm_eval/") for k in r)]
    assert not (run_dir / "eval").exists() or not list((run_dir / "eval").glob("lm-eval-*"))
