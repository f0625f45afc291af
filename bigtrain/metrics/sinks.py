"""Where a run's metrics go, on global rank 0 only: ``metrics.jsonl``, wandb and the console display.

``MetricsLogger`` is one object per process. On global rank 0 it appends one JSON line per ``log()``
call to ``run_dir/metrics.jsonl``, mirrors the metrics to wandb, and drives the console progress
display (``progress.py``). On every other rank it is a cheap no-op (``enabled=False``).
With ``curves=True`` it also redraws ``run_dir/curves.png`` (``plots.py``) when asked and at close.

wandb is imported lazily and only here. It never stops training: "online" without an API key
falls back to "offline", and any exception from wandb warns once and turns wandb off.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bigtrain.metrics.files import METRICS_FILE
from bigtrain.metrics.progress import DISPLAY_KEYS, ProgressDisplay, stderr_is_tty



class MetricsLogger:
    """Writes metrics.jsonl, mirrors to wandb and shows progress; a no-op when not enabled.

    ``cfg`` is a ``LoggingConfig``: ``every``, ``wandb`` ("online" | "offline" | "disabled"),
    ``wandb_project``, ``wandb_entity`` and ``progress``. ``curves``: ``write_curves()`` and ``close()``
    redraw ``run_dir/curves.png`` from metrics.jsonl (training passes True; bench does not).
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        *,
        enabled: bool,
        run_name: str | None,  # the wandb run's name (None: wandb picks one)
        config: dict,
        total_steps: int,
        start_step: int = 0,
        wandb_run_id: str | None = None,
        metrics_file: bool = True,
        curves: bool = False,
    ) -> None:
        self._enabled = enabled
        self._run_dir = Path(run_dir)
        self._curves = curves
        self._curves_warned = False
        self._logged_since_curves = 0
        self._next_curves_at = 0.0  # time.monotonic() before which write_curves() skips (see there)
        self._closed = False
        self._wandb_run_id = wandb_run_id
        self._wandb_run = None
        self._file = None
        self._display: ProgressDisplay | None = None
        if not enabled:
            return

        if cfg.progress:
            self._display = ProgressDisplay(total_steps, start_step, live=stderr_is_tty())
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if metrics_file:  # False: wandb only (`bigtrain eval --tasks` logging into a finished run)
            path = run_dir / METRICS_FILE
            aside = _continue_from(path, start_step)
            if aside is not None and start_step == 0:
                self.message(f"bigtrain: a fresh start in a run dir that has logged before: its {METRICS_FILE} is "
                             f"kept as {aside}")
            elif aside is not None:
                self.message(f"bigtrain: resuming at step {start_step}: {METRICS_FILE} goes on without its lines past "
                             f"step {start_step} (logged after the last checkpoint; redone now) — the whole earlier "
                             f"file is kept as {aside}")
            self._file = path.open("a", encoding="utf-8")
        self._wandb_run = self._start_wandb(cfg, run_dir, run_name, config, wandb_run_id)
        if self._wandb_run is not None:
            self._wandb_run_id = self._wandb_run.id

    @property
    def wandb_run_id(self) -> str | None:
        """Id of the wandb run (store it in checkpoints so a resume continues the same run)."""
        return self._wandb_run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl, send to wandb, refresh progress.

        With a plain (non-terminal) display, a log() carrying train/perf values prints the
        progress line, so log files get one line per logging interval.
        """
        if not self._enabled or self._closed:
            return
        values = {key: _plain_number(value) for key, value in metrics.items()}
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **values}) + "\n")
            self._file.flush()
        self._logged_since_curves += 1
        if self._wandb_run is not None:
            self._call_wandb(self._wandb_run.log, values, step=step)
        if self._display is not None:
            shown = {arg: values[key] for key, arg in DISPLAY_KEYS.items() if key in values}
            self._display.update(step, **shown, logged=bool(shown))

    def progress(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        tokens_per_sec: float | None = None,
        mfu: float | None = None,
    ) -> None:
        """Advance the live display to ``step``; values left as None keep their last value.

        Cheap enough to call every step: on a terminal the rich bar is refreshed at most
        10 times a second; otherwise nothing is printed here (log() prints the plain line).
        """
        if self._display is not None:
            self._display.update(step, loss=loss, lr=lr, tokens_per_sec=tokens_per_sec, mfu=mfu)

    def message(self, text: str) -> None:
        """Print a line above the progress bar (eval results, warnings)."""
        if not self._enabled:
            return
        if self._display is not None:
            self._display.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def write_curves(self, *, final: bool = False) -> None:
        """Redraw run_dir/curves.png from metrics.jsonl if anything was logged since the last drawing.

        Drawing takes about a second; when evals come faster than every 20 drawings' time, the ones in
        between are skipped (at most ~5 % of the run goes to pictures). ``final`` (close) always draws.
        Never stops training: without matplotlib, or when drawing fails, it warns once (and keeps trying
        when drawing failed, so a passing problem leaves no stale picture).
        """
        if not self._enabled or self._closed or not self._curves or not self._logged_since_curves:
            return
        if not final and time.monotonic() < self._next_curves_at:
            return
        self._logged_since_curves = 0
        from bigtrain.metrics import plots

        if not plots.have_matplotlib():
            self._curves = False
            self._warn(f"matplotlib is not installed: no {plots.CURVES_FILE} — {plots.INSTALL_HINT}")
            return
        start = time.monotonic()
        try:
            plots.write_run_curves(self._run_dir)
            self._next_curves_at = time.monotonic() + 19 * (time.monotonic() - start)
        except Exception as e:  # a picture must never stop training
            if not self._curves_warned:
                self._curves_warned = True
                self._warn(f"could not draw {plots.CURVES_FILE} ({type(e).__name__}: {e}); training goes on")

    def close(self) -> None:
        """Draw the final curves.png, finish wandb, stop the display, close metrics.jsonl. Safe to call twice."""
        if not self._enabled or self._closed:
            return
        self.write_curves(final=True)
        self._closed = True
        if self._display is not None:
            self._display.close()
        if self._wandb_run is not None:
            self._call_wandb(self._wandb_run.finish)
            self._wandb_run = None
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- wandb ------------------------------------------------------------------------------

    def _start_wandb(self, cfg, run_dir: Path, run_name: str | None, config: dict, run_id: str | None):
        """Start a wandb run, or return None (with one warning) when it is off or fails."""
        mode = cfg.wandb
        if mode == "disabled":
            return None
        if mode == "online" and not _have_wandb_api_key():
            self._warn("wandb is 'online' but no API key was found (WANDB_API_KEY or ~/.netrc); "
                       "logging offline — upload later with `wandb sync`")
            mode = "offline"
        try:
            import wandb

            settings = wandb.Settings(
                silent=True,  # our display owns the console
                console="off",  # do not capture stdout/stderr (it garbles the live bar)
                x_disable_stats=True,  # no system-metrics sampler process
            )
            return wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=run_name,
                dir=str(run_dir),
                config=config,
                mode=mode,
                id=run_id,  # None: wandb makes a new id, read back through wandb_run_id
                resume="allow",  # same id after a restart continues the same run
                settings=settings,
            )
        except Exception as e:  # wandb must never stop training
            self._warn(f"wandb failed to start ({type(e).__name__}: {e}); continuing without wandb")
            return None

    def _call_wandb(self, fn, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # wandb must never stop training
            self._wandb_run = None
            self._warn(f"wandb failed ({type(e).__name__}: {e}); continuing without wandb")

    def _warn(self, text: str) -> None:
        self.message(f"warning: {text}")


# -- helpers ------------------------------------------------------------------------------------

def _continue_from(path: Path, start_step: int) -> Path | None:
    """Make metrics.jsonl end at ``start_step`` (0: a fresh start, empty) and return where the earlier file was
    set aside whole, or None when nothing had to go. Lines past ``start_step`` were logged by a run killed after
    its last checkpoint and are about to be redone; dropping them keeps the live file free of repeats, and
    keeping the earlier file keeps every line ever logged (e.g. the history of a run restarted from step 0)."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _line_step(line) <= start_step] if start_step else []
    if len(kept) == len(lines):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.stem}.set-aside-{stamp}{path.suffix}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.stem}.set-aside-{stamp}-{n}{path.suffix}"), n + 1
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path, aside)  # a crash between the two renames leaves every line in `aside`
    os.replace(tmp, path)
    return aside


def _line_step(line: str) -> float:
    """The "step" of one metrics.jsonl line; infinity (dropped) for a line that does not parse."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain_number(value: Any) -> Any:
    """Python number for JSON and wandb (accepts 0-d tensors and numpy scalars)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return float(value)


def _have_wandb_api_key() -> bool:
    """True when wandb can authenticate: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    netrc_path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return host is not None and netrc.netrc(netrc_path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False

