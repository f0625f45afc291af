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


class PeakMemory:
    """The peak memory of what a run allocates after this object is made (run.py makes it just before the
    model is built), in GB: what `bigtrain check`'s memory plan predicts.

    On CUDA the caching allocator's peak above what was allocated at the start. Elsewhere the peak resident
    set above the one at the start: Linux's high-water mark (VmHWM) is reset here through
    /proc/self/clear_refs; where that is not possible, the process's lifetime peak RSS. On a CPU, glibc keeps
    freed blocks under its (adaptive) mmap threshold in the heap, so RSS can stay above what is live; run with
    MALLOC_MMAP_THRESHOLD_=65536 to make it follow the live tensors (the memory-plan test does)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return
        self.start = _proc_status_bytes("VmRSS") or _lifetime_peak_rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.high_water = True
        except OSError:
            self.high_water = False

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = (self.high_water and _proc_status_bytes("VmHWM")) or _lifetime_peak_rss()
        return max(peak - self.start, 0)

    def gb(self) -> float:
        return self.peak_bytes() / 1e9


def _proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux, kB) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _lifetime_peak_rss() -> int:
    import resource  # Unix only

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux KiB


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

