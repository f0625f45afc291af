"""Eval results out of the process (bigtrain/eval/report.py): scalars to the logger, the eval file, the console table."""

from __future__ import annotations

import json

import numpy as np

from bigtrain.eval.report import classification_table, console_text, report_eval, scalars, write_eval_file
from bigtrain.tasks import classification_scores


class RecordingLogger:
    def __init__(self):
        self.logged, self.messages = [], []

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def message(self, text):
        self.messages.append(text)


def binary_metrics() -> dict:
    # rows: true neg / pos; columns: predicted neg / pos
    return {"eval/loss": 0.5, **classification_scores(np.array([[5, 1], [2, 4]]), ["neg", "pos"])}


def test_report_eval_logs_scalars_and_writes_the_classification_file_on_rank_0_only(tmp_path):
    metrics, logger = binary_metrics(), RecordingLogger()
    report_eval(logger, 7, metrics, run_dir=None)  # another rank: logs (a no-op logger there), writes nothing
    assert not (tmp_path / "eval").exists()
    report_eval(logger, 7, metrics, run_dir=tmp_path)
    step, logged = logger.logged[-1]
    assert step == 7 and logged == scalars(metrics)
    assert "confusion_matrix" not in logged and logged["eval/f1/pos"] == metrics["eval/f1/pos"]
    written = json.loads((tmp_path / "eval/step-0000007.json").read_text())
    assert written == {"step": 7, "checkpoint": None, **metrics}
    assert not list((tmp_path / "eval").glob("*.tmp"))
    # A language-model eval has no report: a log line, no file.
    report_eval(logger, 8, {"eval/loss": 2.0, "eval/ppl": 7.389}, run_dir=tmp_path)
    assert logger.messages[-1] == "step 8: eval/loss 2.0000 · eval/ppl 7.3890"
    assert not (tmp_path / "eval/step-0000008.json").exists()


def test_console_table_has_per_class_rows_averages_positive_class_and_the_matrix(tmp_path):
    metrics = binary_metrics()
    text = console_text(3, metrics)
    first, *table = text.splitlines()
    assert first == "step 3: eval/loss 0.5000 · eval/accuracy 0.7500 · eval/f1 0.7483"  # nested keys are in the table
    assert table[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert table[1].split() == ["neg", "0.7143", "0.8333", "0.7692", "6"]
    assert table[2].split() == ["pos", "0.8000", "0.6667", "0.7273", "6"]
    assert table[3].split() == ["accuracy", "0.7500", "12"]
    assert [row.split()[0] for row in table[4:7]] == ["macro", "weighted", "micro"]
    assert table[7].split() == ["positive:", "pos", "0.8000", "0.6667", "0.7273", "6"]
    assert table[-4] == "confusion matrix (rows: true label, columns: predicted)"
    assert [row.split() for row in table[-3:]] == [["neg", "pos"], ["neg", "5", "1"], ["pos", "2", "4"]]
    assert len({len(row) for row in table[-3:]}) == 1
    assert len({len(row) for row in table[:8]}) == 1  # fixed width
    wide = classification_scores(np.eye(25, dtype=np.int64), [f"c{i}" for i in range(25)])
    assert classification_table(wide).splitlines()[-1] == "confusion matrix: 25×25, in eval/step-NNNNNNN.json"
    path = write_eval_file(tmp_path / "eval/step-0000003.json", 3, metrics, checkpoint=tmp_path / "ck")
    assert json.loads(path.read_text())["checkpoint"] == str(tmp_path / "ck")
