"""Loss curves from ``metrics.jsonl``: ``RUN/curves.png`` while a run trains, ``bigtrain plot`` for several runs.

``read_series`` turns a run's metrics.jsonl into one (steps, values) series per key, one value per step,
so a resumed run draws as one unbroken line: no gap, no doubled segment. ``plot_runs`` draws one panel
per metric name (``train/loss`` and ``eval/loss`` share the "loss" panel), one colour per run.

matplotlib is imported only here, inside the functions that draw, through its object-oriented API on
the Agg canvas: no display, no pyplot global state. It is the ``[plot]`` extra; ``have_matplotlib``
says whether it is installed.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

from bigtrain.core.fsio import write_atomic
from bigtrain.metrics.files import METRICS_FILE

CURVES_FILE = "curves.png"
INSTALL_HINT = "pip install 'bigtrain[plot]'"
# Drawn by default when present, in this order; then the task's eval metrics (eval/accuracy, eval/f1, ...).
DEFAULT_KEYS = ("train/loss", "eval/loss", "train/lr", "perf/tokens_per_sec", "train/grad_norm")
_NOT_TASK_METRICS = ("eval/loss", "eval/ppl")  # ppl is exp(loss): the loss panel already shows it

Series = dict[str, tuple[list[int], list[float]]]  # key -> (steps ascending, values)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_series(path: Path) -> Series:
    """Each numeric key of a metrics.jsonl as (steps, values) in step order, one value per step.

    Lines are read in file order. A line whose step is below the line before it starts a redone segment
    (a run resumed from an earlier checkpoint): every record from before it at that step or later is
    dropped. Within one step the last value of each key wins (train and eval records of one step merge).
    Torn or unreadable lines are skipped.
    """
    by_step: dict[int, dict[str, float]] = {}
    previous = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        if previous is not None and step < previous:
            for stale in [s for s in by_step if s >= step]:
                del by_step[stale]
        previous = step
        by_step.setdefault(step, {}).update(
            {key: float(value) for key, value in record.items()
             if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)})
    series: Series = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(value)
    return series


def default_keys(series: Series) -> list[str]:
    """DEFAULT_KEYS that are present, then the task's top-level eval metrics (eval/<name>, not loss or ppl)."""
    task = sorted(k for k in series if k.startswith("eval/") and k.count("/") == 1 and k not in _NOT_TASK_METRICS)
    return [k for k in DEFAULT_KEYS if k in series] + task


def panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Keys grouped by their name after the first "/" (train/loss + eval/loss → "loss"), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split("/", 1)[-1], []).append(key)
    return list(groups.items())


def plot_runs(runs: dict[str, Series], keys: list[str], out: Path, *, log_steps: bool = False) -> Path:
    """Draw `keys` of every run (name -> series) to the PNG `out` (written to a tmp file, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = io.BytesIO()
    figure(runs, keys, log_steps=log_steps).savefig(picture, format="png", dpi=100)
    write_atomic(out, picture.getvalue())  # a viewer never reads half a picture
    return out


def figure(runs: dict[str, Series], keys: list[str], *, log_steps: bool = False):
    """A matplotlib Figure: one panel per group of `panels(keys)`, one colour per run, eval dashed with markers."""
    from matplotlib.figure import Figure  # the [plot] extra; a Figure saves through the Agg canvas

    groups = panels(keys)
    cols = 1 if len(groups) == 1 else 2
    rows = -(-len(groups) // cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).flatten()
    for ax, (name, group) in zip(axes, groups):
        for i, (run, series) in enumerate(runs.items()):
            for key in group:
                if key not in series:
                    continue
                steps, values = series[key]
                label = " ".join(([run] if len(runs) > 1 else []) + ([key.split("/")[0]] if len(group) > 1 else []))
                evaluated = key.startswith("eval/")
                ax.plot(steps, values, color=f"C{i % 10}", linestyle="--" if evaluated else "-",
                        marker="o" if evaluated else None, markersize=3, linewidth=1.2, label=label or None)
        ax.set_title(name if len(group) > 1 else group[0], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_steps:
            ax.set_xscale("log")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    if len(runs) == 1:
        fig.suptitle(next(iter(runs)), fontsize=11)
    return fig


def write_run_curves(run_dir: Path) -> Path:
    """RUN/curves.png: the default metrics of one run, redrawn from its metrics.jsonl."""
    run_dir = Path(run_dir)
    series = read_series(run_dir / METRICS_FILE)
    return plot_runs({run_dir.name: series}, default_keys(series), run_dir / CURVES_FILE)
