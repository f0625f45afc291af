"""Throughput math: step timing (wall time, data wait), MFU against the device peak, peak memory."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

import torch


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

