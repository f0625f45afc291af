"""Preemption: SIGTERM or SIGUSR1 (Slurm's warning signal, `scancel --signal`, a plain `kill`) asks
training to stop at the next step boundary with a complete checkpoint.

The handler only sets a flag. The loop folds the flag into the all-reduce it already does at the
start of every step, so all ranks see the request at the same step, save together and exit — no
rank is left waiting in a collective. A second signal while saving changes nothing (the flag is
already set; the save is atomic anyway). Stdlib only: `bigtrain launch` (no torch) imports it too.
"""

from __future__ import annotations

import signal
import threading

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — the run continues from its checkpoint when restarted
PREEMPTED_MARKER = "preempted.json"  # in the run dir, by rank 0 after the checkpoint: `bigtrain launch` requeues on it


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; rerunning the same command continues it."""

    def __init__(self, signal_name: str, step: int):
        saved = "checkpoint saved" if step else "no step done yet, nothing to save"
        super().__init__(f"preempted by {signal_name} at step {step}; {saved} — run the same command to continue "
                         f"(checkpoint.resume: auto)")
        self.signal_name, self.step = signal_name, step


class PreemptionGuard:
    """Installs the handlers for its `with` block (main thread only) and restores the old ones after
    (or ignores the signals from then on, once one asked to stop)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            # After a preemption the process is on its way out with exit code 75: a repeated signal (Slurm
            # sends it to every process, the launcher forwards it) must not turn that into "killed".
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()
