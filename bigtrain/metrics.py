"""Training telemetry: console progress, ``metrics.jsonl``, wandb, and MFU / throughput math.

Owns everything a run reports about itself while it trains:

- ``MetricsLogger``: one object per process. On global rank 0 it appends one JSON line per
  ``log()`` call to ``run_dir/metrics.jsonl``, mirrors the metrics to wandb, and drives the
  console progress display. On every other rank it is a cheap no-op (``enabled=False``).
- ``StepTimer``: wall time per step and the share of it spent waiting for data.
- ``mfu``: model FLOPs utilisation against the device's matmul peak (``bigtrain/hardware.py``).
- ``max_memory_gb``: peak accelerator memory (CUDA) or peak resident memory (CPU).

wandb is imported lazily and only here. It never stops training: "online" without an API key
falls back to "offline", and any exception from wandb warns once and turns wandb off.

Metric keys the training loop logs (``metrics.jsonl`` lines are ``{"step": N, **metrics}``):

    train/loss           mean loss per target token over the optimizer step
    train/lr             learning rate of the first parameter group
    train/grad_norm      global gradient norm before clipping
    train/skipped_steps  optimizer steps skipped so far (non-finite gradients)
    perf/tokens_per_sec  tokens processed per second, all ranks together
    perf/mfu             model FLOPs utilisation, a fraction of the peak (0.42 = 42 %)
    perf/step_time_s     mean wall time of one optimizer step
    perf/data_wait_frac  fraction of step time spent waiting for the next batch
    perf/max_memory_gb   peak memory of rank 0 (see ``max_memory_gb``)
    eval/loss            mean loss per target token on the eval set
    eval/ppl             exp(eval/loss)
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import netrc
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

METRICS_FILE = "metrics.jsonl"

# logged key -> argument of MetricsLogger.progress(); log() feeds these to the display
_DISPLAY_KEYS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "perf/tokens_per_sec": "tokens_per_sec",
    "perf/mfu": "mfu",
}


class MetricsLogger:
    """Writes metrics.jsonl, mirrors to wandb and shows progress; a no-op when not enabled.

    ``cfg`` is a ``LoggingConfig``: ``every``, ``wandb`` ("online" | "offline" | "disabled"),
    ``wandb_project``, ``wandb_entity`` and ``progress``.
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        *,
        enabled: bool,
        run_name: str,
        config: dict,
        total_steps: int,
        start_step: int = 0,
        wandb_run_id: str | None = None,
        metrics_file: bool = True,
    ) -> None:
        self._enabled = enabled
        self._closed = False
        self._wandb_run_id = wandb_run_id
        self._wandb_run = None
        self._file = None
        self._display: _ProgressDisplay | None = None
        if not enabled:
            return

        if cfg.progress:
            self._display = _ProgressDisplay(total_steps, start_step, live=_stderr_is_tty())
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if metrics_file:  # False: wandb only (`bigtrain eval --tasks` logging into a finished run)
            path = run_dir / METRICS_FILE
            # Steps after start_step were logged by a run killed after its last checkpoint and will
            # be redone; dropping them (also when start_step is 0) keeps the file free of repeats.
            _drop_lines_after(path, start_step)
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
        if self._wandb_run is not None:
            self._call_wandb(self._wandb_run.log, values, step=step)
        if self._display is not None:
            shown = {arg: values[key] for key, arg in _DISPLAY_KEYS.items() if key in values}
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

    def close(self) -> None:
        """Finish wandb, stop the display, close metrics.jsonl. Safe to call twice."""
        if not self._enabled or self._closed:
            return
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

    def _start_wandb(self, cfg, run_dir: Path, run_name: str, config: dict, run_id: str | None):
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


class _ProgressDisplay:
    """step/total, loss, lr, tokens/s, MFU and ETA: a rich bar on a terminal, else plain lines."""

    _REFRESH_S = 0.1  # push to the rich bar at most this often

    def __init__(self, total_steps: int, start_step: int, *, live: bool) -> None:
        self.total = total_steps
        self.step = start_step
        self.loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None
        self._printed_step = start_step
        self._last_push = 0.0
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=20)
        self._bar = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("train"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, stats="")
            self._bar.start()

    def update(self, step: int, *, loss=None, lr=None, tokens_per_sec=None, mfu=None,
               logged: bool = False) -> None:
        self.step = step
        if loss is not None:
            self.loss = loss
        if lr is not None:
            self.lr = lr
        if tokens_per_sec is not None:
            self.tokens_per_sec = tokens_per_sec
        if mfu is not None:
            self.mfu = mfu
        if self._bar is not None:
            now = time.perf_counter()
            if logged or now - self._last_push >= self._REFRESH_S:
                self._last_push = now
                self._push(now)
        elif logged and step > self._printed_step:
            self._print_line()

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._push(time.perf_counter())
            self._bar.stop()
        elif self.step > self._printed_step:
            self._print_line()

    def _push(self, now: float) -> None:
        self._record_rate_sample(now)
        self._bar.update(self._task, completed=self.step, stats=self._stats())

    def _print_line(self) -> None:
        self._record_rate_sample(time.perf_counter())
        self._printed_step = self.step
        print(f"step {self.step}/{self.total} | {self._stats()}", file=sys.stderr, flush=True)

    def _record_rate_sample(self, now: float) -> None:
        if not self._samples or self._samples[-1][1] != self.step:
            self._samples.append((now, self.step))

    def _stats(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.tokens_per_sec is not None:
            parts.append(f"{self.tokens_per_sec:,.0f} tok/s")
        if self.mfu is not None:
            parts.append(f"MFU {self.mfu:.1%}")
        eta_s = self._eta_s()
        if eta_s is not None:
            parts.append(f"ETA {_format_duration(eta_s)}")
        return " | ".join(parts)

    def _eta_s(self) -> float | None:
        """Remaining time at the step rate over the last few displayed updates."""
        if not self._samples:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if s1 <= s0:
            return None
        return (t1 - t0) / (s1 - s0) * max(self.total - self.step, 0)


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops_per_sec: float) -> float:
    """Model FLOPs utilisation, a fraction: achieved model FLOP/s over the hardware peak."""
    return flops_per_token * tokens_per_sec / peak_flops_per_sec


def max_memory_gb(device: torch.device) -> float:
    """Peak memory in GB: CUDA max allocated on ``device``, else this process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # Unix only

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return max_rss * bytes_per_unit / 1e9


class StepTimer:
    """Accumulates per-step timings: wall time of the whole step and time spent waiting for data.

    Usage in the loop (on CUDA, synchronize before ``end_step``)::

        timer.start_step()
        with timer.data_wait():
            batch = next(batches)
        ...
        dt = timer.end_step()
        if logging: stats = timer.window()
    """

    def __init__(self) -> None:
        self.step_time_s = 0.0  # wall time of the last finished step
        self._step_start = time.perf_counter()
        self._reset_window()

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Time the enclosed block as data wait (use it between start_step and end_step)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._data_wait_s += time.perf_counter() - start

    def end_step(self) -> float:
        """Finish the step; returns its wall time in seconds."""
        self.step_time_s = time.perf_counter() - self._step_start
        self._steps += 1
        self._time_s += self.step_time_s
        return self.step_time_s

    @property
    def data_wait_frac(self) -> float:
        """Share of step time spent waiting for data since the last ``window()``."""
        return self._data_wait_s / self._time_s if self._time_s > 0 else 0.0

    def window(self) -> dict[str, float]:
        """Aggregates since the last call, then reset: steps, time_s, data_wait_s, step_time_s (mean)."""
        stats = {
            "steps": self._steps,
            "time_s": self._time_s,
            "data_wait_s": self._data_wait_s,
            "step_time_s": self._time_s / self._steps if self._steps else 0.0,
        }
        self._reset_window()
        return stats

    def _reset_window(self) -> None:
        self._steps = 0
        self._time_s = 0.0
        self._data_wait_s = 0.0


# -- helpers ------------------------------------------------------------------------------------

def _drop_lines_after(path: Path, last_step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without lines past ``last_step`` or torn lines."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _line_step(line) <= last_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _stderr_is_tty() -> bool:
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
