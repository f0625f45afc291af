"""Tests for bigtrain/metrics/plots.py, the logger's curves.png and `bigtrain plot`: series read from
hand-written metrics.jsonl files (a resumed run among them), the PNG, exit codes and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain.cli import main
from bigtrain.metrics import MetricsLogger, plots
from tests.unit.test_metrics import LoggingConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, records: list[dict], torn_tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)
    return run_dir


def train_records(steps, loss=lambda s: 10.0 / s) -> list[dict]:
    return [{"step": s, "train/loss": loss(s), "train/lr": 1e-3 * s, "train/grad_norm": 1.0,
             "perf/tokens_per_sec": 100.0 * s} for s in steps]


def classification_run(run_dir: Path) -> Path:
    records = []
    for s in range(1, 9):
        records += train_records([s])
        if s % 4 == 0:
            records.append({"step": s, "eval/loss": 2.0 / s, "eval/ppl": 9.9, "eval/accuracy": s / 10,
                            "eval/f1": s / 20, "eval/macro/f1": 0.1})
    return write_metrics(run_dir, records)


def resumed_run(run_dir: Path) -> Path:
    """Steps 1-6 logged (eval at 4 and 6), killed; resumed from the step-3 checkpoint and redone to 8 with new values."""
    first = train_records(range(1, 7)) + [{"step": 4, "eval/loss": 9.0}, {"step": 6, "eval/loss": 9.0}]
    first.sort(key=lambda r: r["step"])
    redone = train_records(range(4, 9), loss=lambda s: 1.0 / s) + [{"step": 8, "eval/loss": 0.5}]
    return write_metrics(run_dir, first + redone)


def test_series_merge_train_and_eval_records_of_a_step(tmp_path):
    series = plots.read_series(classification_run(tmp_path / "run") / "metrics.jsonl")
    assert series["train/loss"] == (list(range(1, 9)), [10.0 / s for s in range(1, 9)])
    assert series["eval/loss"] == ([4, 8], [0.5, 0.25])
    assert series["eval/accuracy"] == ([4, 8], [0.4, 0.8])


def test_resumed_run_has_one_value_per_step_the_redone_one_and_no_gap(tmp_path):
    series = plots.read_series(resumed_run(tmp_path / "run") / "metrics.jsonl")
    steps, losses = series["train/loss"]
    assert steps == list(range(1, 9))  # no doubled segment, no gap
    assert losses == [10.0 / s for s in (1, 2, 3)] + [1.0 / s for s in range(4, 9)]  # the redone values win
    assert series["eval/loss"] == ([8], [0.5])  # the evals at 4 and 6 were before the restart: dropped


def test_repeated_step_last_record_wins_and_torn_lines_are_skipped(tmp_path):
    records = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5},
               {"step": 3, "train/loss": 1.0, "note": "text", "flag": True}]
    series = plots.read_series(write_metrics(tmp_path, records, torn_tail='{"step": 4, "train/lo') / "metrics.jsonl")
    assert series == {"train/loss": ([1, 2, 3], [3.0, 1.5, 1.0])}


def test_default_keys_and_panels():
    series = {k: ([1], [1.0]) for k in ("eval/f1", "train/loss", "eval/loss", "eval/ppl", "eval/macro/f1",
                                          "train/lr", "perf/mfu", "eval/accuracy")}
    keys = plots.default_keys(series)
    assert keys == ["train/loss", "eval/loss", "train/lr", "eval/accuracy", "eval/f1"]
    assert plots.panels(keys) == [("loss", ["train/loss", "eval/loss"]), ("lr", ["train/lr"]),
                                  ("accuracy", ["eval/accuracy"]), ("f1", ["eval/f1"])]


def test_figure_draws_the_resumed_series_once(tmp_path):
    series = plots.read_series(resumed_run(tmp_path / "run") / "metrics.jsonl")
    fig = plots.figure({"run": series}, ["train/loss", "eval/loss"])
    (train_line, eval_line), = [ax.lines for ax in fig.axes if ax.get_visible()]
    assert list(train_line.get_xdata()) == list(range(1, 9)) and list(eval_line.get_xdata()) == [8]


def test_run_curves_png_is_written(tmp_path):
    out = plots.write_run_curves(classification_run(tmp_path / "run"))
    assert out == tmp_path / "run" / "curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png", "metrics.jsonl"]  # no tmp file left


def make_logger(run_dir: Path) -> MetricsLogger:
    return MetricsLogger(LoggingConfig(progress=False), run_dir, enabled=True, run_name="r", config={},
                         total_steps=10, curves=True)


def test_logger_draws_curves_when_asked_only_after_new_records_and_at_close(tmp_path):
    logger = make_logger(tmp_path)
    logger.log(1, {"train/loss": 2.0})
    logger.write_curves()
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "curves.png").unlink()
    logger.write_curves(final=True)  # nothing logged since: nothing to redraw
    assert not (tmp_path / "curves.png").exists()
    logger.log(2, {"train/loss": 1.0})
    logger.close()
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_logger_without_matplotlib_warns_once_and_keeps_logging(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    with make_logger(tmp_path) as logger:
        for step in (1, 2):
            logger.log(step, {"train/loss": 1.0})
            logger.write_curves()
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1 and "pip install 'bigtrain[plot]'" in err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2 and not (tmp_path / "curves.png").exists()


def test_logger_drawing_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def broken(run_dir):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "write_run_curves", broken)
    with make_logger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"train/loss": 1.0})
            logger.write_curves()
    assert capsys.readouterr().err.count("could not draw curves.png (RuntimeError: no fonts)") == 1


def test_cli_plot_one_run_writes_its_curves_png(tmp_path, capsys):
    run = classification_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(run), "--metric", "eval/accuracy", "train/loss", "-o", str(tmp_path / "acc.png"),
                 "--log-steps"]) == 0
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_plot_several_runs_defaults_to_curves_png_here(tmp_path, monkeypatch):
    a, b = classification_run(tmp_path / "a"), resumed_run(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(a), str(b)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert not (a / "curves.png").exists()


@pytest.mark.parametrize("case", ["no metrics.jsonl", "unknown metric", "no matplotlib"])
def test_cli_plot_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    run = classification_run(tmp_path / "run")
    argv = ["plot", str(run)]
    if case == "no metrics.jsonl":
        argv.append(str(tmp_path / "missing"))
        expected = f"'{tmp_path / 'missing'}' has no metrics.jsonl"
    elif case == "unknown metric":
        argv += ["--metric", "eval/bleu"]
        expected = "no run has eval/bleu — its keys: eval/accuracy"
    else:
        monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
        expected = "matplotlib is not installed — pip install 'bigtrain[plot]'"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bigtrain: error: plot") and expected in err
    assert not (run / "curves.png").exists()
