"""Where eval results go: scalars to metrics.jsonl / wandb, the eval/<checkpoint>.json file, console text.

A task's `eval_metrics` is one flat dict. Its numbers (eval/… keys) are what metrics.jsonl and wandb
get; classification adds `labels`, `confusion_matrix` (rows = true label, columns = predicted, in
labels.json order) and `per_class` (label, precision, recall, f1, support), which go only to the file and
the console table. Training (rank 0, at each eval of a task with that report) and `bigtrain eval` both
write the file through `write_eval_file`, so it has one format:
`{"step", "checkpoint" (null from training), <eval/… scalars>, <report>}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from bigtrain.core.fsio import write_atomic

EVAL_DIR = "eval"
MAX_MATRIX_LABELS = 20  # a wider confusion matrix is only in the file, not on the console
_LABEL_WIDTH = 24


def eval_file(run_dir: Path, name: str) -> Path:
    """run_dir/eval/NAME.json (NAME: the checkpoint folder's name, step-NNNNNNN)."""
    return Path(run_dir) / EVAL_DIR / f"{name}.json"


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries: what metrics.jsonl, wandb and `bigtrain eval`'s stdout line carry."""
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float))}


def write_eval_file(path: Path, step: int, metrics: dict, checkpoint: Path | str | None = None) -> Path:
    """Write `metrics` of the eval at `step` to `path` (atomically: a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"step": step, "checkpoint": None if checkpoint is None else str(checkpoint),
                                   **metrics}, indent=1))
    return path


def report_eval(logger, step: int, metrics: dict, run_dir: Path | None = None) -> None:
    """One eval during training: scalars to the logger, console text, and for a task with a report
    (classification) run_dir/eval/step-NNNNNNN.json. Pass run_dir on rank 0 only: only it writes."""
    logger.log(step, scalars(metrics))
    logger.message(console_text(step, metrics))
    report = metrics.get("lm_eval_report")  # eval.tasks: the file and table `bigtrain eval --tasks` writes
    if report is not None:
        from bigtrain.eval.lm_eval import REPORT_PREFIX, scores_table

        logger.message(scores_table(report["tasks"]))
        if run_dir is not None:
            write_eval_file(Path(run_dir) / EVAL_DIR / f"{REPORT_PREFIX}step-{step:07d}.json", step, report)
    if run_dir is not None and "confusion_matrix" in metrics:
        write_eval_file(eval_file(run_dir, f"step-{step:07d}"), step, metrics)


def console_text(step: int, metrics: dict) -> str:
    """`step N: eval/loss … · eval/accuracy …` (top-level eval/<name> scalars) and, for classification, the table."""
    line = f"step {step}: " + " · ".join(f"{k} {v:.4f}" for k, v in scalars(metrics).items() if k.count("/") <= 1)
    return line + ("\n" + classification_table(metrics) if "confusion_matrix" in metrics else "")


def _short(label, width: int) -> str:
    text = str(label)
    return text if len(text) <= width else text[:width - 1] + "…"


def classification_table(metrics: dict) -> str:
    """Fixed-width text: per-class precision / recall / F1 / support, accuracy and the averages (and the
    positive class of a binary task), then the confusion matrix when there are at most MAX_MATRIX_LABELS labels."""
    per_class, matrix = metrics["per_class"], metrics["confusion_matrix"]
    total = sum(row["support"] for row in per_class)
    positive = f"positive: {_short(per_class[1]['label'], _LABEL_WIDTH)}" if "eval/positive/f1" in metrics else ""
    width = max(len("weighted avg"), len(positive), *(len(_short(row["label"], _LABEL_WIDTH)) for row in per_class))

    def row(name: str, p: float | None, r: float | None, f: float, n: int) -> str:
        cells = "".join(f"{'' if v is None else f'{v:.4f}':>10}" for v in (p, r, f))
        return f"{name:<{width}}{cells}{n:>9}"

    def scores(prefix: str) -> tuple[float, float, float]:
        """Precision, recall and F1 under `prefix` (eval/macro, eval/positive, ...)."""
        return metrics[f"{prefix}/precision"], metrics[f"{prefix}/recall"], metrics[f"{prefix}/f1"]

    lines = [f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    lines += [row(_short(c["label"], _LABEL_WIDTH), c["precision"], c["recall"], c["f1"], c["support"]) for c in per_class]
    lines.append(row("accuracy", None, None, metrics["eval/accuracy"], total))
    for average in ("macro", "weighted", "micro"):
        lines.append(row(f"{average} avg", *scores(f"eval/{average}"), total))
    if positive:
        lines.append(row(positive, *scores("eval/positive"), per_class[1]["support"]))
    if len(matrix) > MAX_MATRIX_LABELS:
        lines.append(f"confusion matrix: {len(matrix)}×{len(matrix)}, in eval/step-NNNNNNN.json")
        return "\n".join(lines)
    names = [_short(c["label"], 8) for c in per_class]
    cell = max(*(len(n) for n in names), *(len(str(v)) for r in matrix for v in r)) + 2
    lines += ["", "confusion matrix (rows: true label, columns: predicted)",
              " " * width + "".join(f"{n:>{cell}}" for n in names)]
    lines += [f"{_short(c['label'], _LABEL_WIDTH):<{width}}" + "".join(f"{v:>{cell}}" for v in r)
              for c, r in zip(per_class, matrix)]
    return "\n".join(lines)
