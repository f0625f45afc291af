"""Preemption: SIGTERM or SIGUSR1 (Slurm's warning signal, `scancel --signal`, a plain `kill`) stops the job
within STOP_WITHIN_S, in any phase, with a complete checkpoint when there is something new to save.

In the training loop the flag is folded into the all-reduce it already does at the start of every step (and
into eval's per-batch check), so all ranks see the request at the same step, save together and exit 75 — no
rank is left waiting in a collective. Everywhere else (start-up, data preparation, init_from, resume, the
final barrier, a hang) there is no boundary to wait for: with nothing new to save the process exits 75 at
once, and once the loop has stepped it gets STOP_WITHIN_S to reach a boundary before it exits 75 without one.

Python runs a signal handler only when the main thread comes back to the interpreter, which a rank blocked in
a collective or a long C call never does. So the handler's work is done by a thread woken through
`signal.set_wakeup_fd`: it sees the signal at once in every phase. Copies of one request (Slurm signals every
process of the step and the launcher forwards it too) count once; a SIGTERM REPEAT_AFTER_S or more after the
first means "now": the process exits EXIT_TERMINATED at once. Stdlib only: `bigtrain launch` imports it too.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the run continues from its checkpoint when restarted
EXIT_TERMINATED = 128 + signal.SIGTERM  # a second SIGTERM: what the shell reports for a process SIGTERM killed
PREEMPTED_MARKER = "preempted.json"  # in the run dir, by rank 0 after the checkpoint: `bigtrain launch` requeues on it
STOP_WITHIN_S = 50.0  # from the signal to the step boundary's save; Slurm's KillWait is 30 s by default, plus its grace
REPEAT_AFTER_S = 2.0  # a SIGTERM sooner than this after the first is a copy of the same request
# What signal.signal takes and returns: a function, SIG_DFL / SIG_IGN, or None (a handler not set from Python).
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; rerunning the same command continues it."""

    def __init__(self, signal_name: str, step: int):
        saved = "checkpoint saved" if step else "no step done yet, nothing to save"
        super().__init__(f"preempted by {signal_name} at step {step}; {saved} — run the same command to continue "
                         f"(checkpoint.resume: auto)")
        self.signal_name, self.step = signal_name, step


class PreemptionGuard:
    """Installs the handlers for its `with` block (main thread only) and restores the old ones after
    (or ignores the signals from then on, once one asked to stop).

    What the run tells it: `unsaved` (steps done since the last save: wait for the loop's boundary, at most
    stop_within_s), `at_boundary()` (the loop is saving for the stop: no deadline any more), `where` (a
    description of this rank's position for the message), `before_exit(signal_name)` (rank 0 writes
    preempted.json before a stop outside the loop) and `held()` (true while the hang watchdog is reporting: its
    exit 3 wins over a signal's, e.g. the SIGTERM torchrun sends the others once the first rank's report ends it)."""

    def __init__(self, stop_within_s: float = STOP_WITHIN_S, repeat_after_s: float = REPEAT_AFTER_S):
        self.signal_name: str | None = None
        self.stop_within_s, self.repeat_after_s = stop_within_s, repeat_after_s
        self.unsaved = False
        self.where: Callable[[], str] = lambda: "start-up"
        self.before_exit: Callable[[str], None] | None = None
        self.held: Callable[[], bool] = lambda: False
        self._signalled_at: float | None = None
        self._boundary = False
        self._previous: dict[int, _Handler] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def at_boundary(self) -> None:
        """Every rank agreed to stop at this step boundary and saves now: the save is what the signal asked for."""
        self._boundary = True

    def _handle(self, signum, frame) -> None:
        """Python's part runs late (main thread): the watcher thread has seen the signal already, unless something
        (an asyncio loop) has taken the wakeup fd since; then this is the only notice."""
        current = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(current, warn_on_full_buffer=False)
        if self._pipe is None or current != self._pipe[1]:
            self._received(signum, time.monotonic())

    def _received(self, signum: int, now: float) -> None:
        if signum not in PREEMPT_SIGNALS:
            return  # another signal with a Python handler (SIGINT) writes to the wakeup fd too
        if self.signal_name is None:
            self.signal_name, self._signalled_at = signal.Signals(signum).name, now
        elif signum == signal.SIGTERM and self._since_signal(now) >= self.repeat_after_s:
            self._exit(EXIT_TERMINATED, f"a second SIGTERM ({self._since_signal(now):.0f} s after the first "
                                        f"{self.signal_name}) at {self.where()}: exiting at once, without a checkpoint "
                                        f"of the steps since the last")

    def _since_signal(self, now: float) -> float:
        assert self._signalled_at is not None  # set with signal_name
        return now - self._signalled_at

    def _check_deadline(self, now: float) -> None:
        name = self.signal_name
        if name is None or self._boundary:
            return
        if not self.unsaved:
            self._stop_outside_loop(name, f"preempted by {self.signal_name} at {self.where()}; nothing new to save")
        elif self._since_signal(now) > self.stop_within_s:
            self._stop_outside_loop(name, f"preempted by {self.signal_name}, but no step boundary came within "
                                    f"{self.stop_within_s:g} s (at {self.where()}): exiting without a checkpoint of "
                                    f"the steps since the last")

    def _stop_outside_loop(self, signal_name: str, message: str) -> None:
        try:
            if self.before_exit is not None:
                self.before_exit(signal_name)
        finally:
            self._exit(EXIT_PREEMPTED, message + " — run the same command to continue (checkpoint.resume: auto)")

    def _exit(self, code: int, message: str) -> None:
        """End the process from the watcher thread: the main thread may be blocked where no exception reaches."""
        if self.held():
            return  # the watchdog is ending the process with its own report and exit code
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"bigtrain: {message}\n")
            sys.stderr.flush()
        os._exit(code)

    def _watch(self, read_fd: int) -> None:
        while not self._closing.is_set():
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            now = time.monotonic()
            if ready:
                try:
                    received = os.read(read_fd, 512)
                except OSError:
                    return
                for signum in received:
                    self._received(signum, now)
            if not self._closing.is_set():
                self._check_deadline(now)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = self._pipe = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), name="bigtrain-preempt", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # After a preemption the process is on its way out with exit code 75: a repeated signal (Slurm
            # sends it to every process, the launcher forwards it) must not turn that into "killed".
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._closing.set()
            assert self._thread is not None  # started with the pipe
            self._thread.join()
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
