"""Console progress on rank 0: step/total, loss, lr, tokens/s, MFU and ETA.

A rich bar on a terminal (refreshed at most 10 times a second), plain lines otherwise (one per
logging interval, so log files stay readable). ``MetricsLogger`` (``sinks.py``) drives it.
"""

from __future__ import annotations

import collections
import math
import sys
import time

# logged key -> argument of MetricsLogger.progress(); log() feeds these to the display
DISPLAY_KEYS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "perf/tokens_per_sec": "tokens_per_sec",
    "perf/mfu": "mfu",
}


class ProgressDisplay:
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
        assert self._bar is not None  # pushed only to a live bar
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
            parts.append(f"ETA {format_duration(eta_s)}")
        return " | ".join(parts)

    def _eta_s(self) -> float | None:
        """Remaining time at the step rate over the last few displayed updates."""
        if not self._samples:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if s1 <= s0:
            return None
        return (t1 - t0) / (s1 - s0) * max(self.total - self.step, 0)


def stderr_is_tty() -> bool:
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
