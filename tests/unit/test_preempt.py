"""PreemptionGuard (bigtrain/train/preempt.py) in a real process: signals seen while the main thread is blocked, a stop
outside the step loop, the deadline to reach a boundary, copies of one request, and a second SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

# A process that holds a guard and then blocks its main thread in time.sleep (no boundary ever comes).
# argv: unsaved (0/1), stop_within_s; it prints "ready", and before_exit prints "marker SIGNAL".
GUARDED = """
import sys, time
from bigtrain.train.preempt import PreemptionGuard
with PreemptionGuard(stop_within_s=float(sys.argv[2])) as guard:
    guard.unsaved = sys.argv[1] == "1"
    guard.where = lambda: "step 7 'forward 1/1'"
    guard.before_exit = lambda name: print("marker", name, flush=True)
    print("ready", flush=True)
    time.sleep(60)
print("main thread ended the block", flush=True)
"""


def start_guarded(unsaved: bool, stop_within_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", GUARDED, "1" if unsaved else "0", str(stop_within_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str, str, float]:
    start = time.monotonic()
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err, time.monotonic() - start


def test_a_signal_with_nothing_to_save_exits_75_at_once_with_the_marker():
    """Before the first step (or after the last save) there is nothing to wait for: exit 75 at once, even with the
    main thread blocked, and the run's before_exit (rank 0's preempted.json) runs first."""
    proc = start_guarded(unsaved=False, stop_within_s=50)
    proc.send_signal(signal.SIGUSR1)
    code, out, err, took_s = finish(proc)
    assert code == 75 and took_s < 5, err
    assert out.splitlines() == ["marker SIGUSR1"]  # the block never ended normally
    assert "bigtrain: preempted by SIGUSR1 at step 7 'forward 1/1'; nothing new to save" in err


def test_unsaved_steps_wait_for_the_boundary_and_then_exit_75_without_it_after_the_deadline():
    proc = start_guarded(unsaved=True, stop_within_s=3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err, _ = finish(proc)
    took_s = time.monotonic() - start
    assert code == 75 and 3 <= took_s < 8, (took_s, err)
    assert "marker SIGTERM" in out
    assert "no step boundary came within 3 s (at step 7 'forward 1/1')" in err


def test_copies_of_one_sigterm_count_once_and_a_later_second_sigterm_exits_at_once():
    """Slurm and the launcher both deliver the first request (copies within REPEAT_AFTER_S): still one stop, waiting
    for the boundary. A SIGTERM after that means now: exit 143 at once, while the first still waits."""
    proc = start_guarded(unsaved=True, stop_within_s=50)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a copy
    time.sleep(2.5)
    assert proc.poll() is None  # still waiting for the step boundary
    proc.send_signal(signal.SIGTERM)
    code, out, err, took_s = finish(proc)
    assert code == 128 + signal.SIGTERM and took_s < 3, err
    assert "a second SIGTERM (" in err and "exiting at once" in err
    assert "marker" not in out


def test_after_the_block_signals_are_ignored_once_one_asked_to_stop():
    code = """
import os, signal, time
from bigtrain.train.preempt import PreemptionGuard
with PreemptionGuard() as guard:
    guard.at_boundary()  # the loop reached the boundary: no deadline
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)
    assert guard.requested and guard.signal_name == "SIGTERM"
os.kill(os.getpid(), signal.SIGTERM)  # a late copy while exiting
time.sleep(0.3)
print("alive")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip() == "alive", result.stderr


def test_a_signal_still_stops_when_something_else_took_the_wakeup_fd():
    """An asyncio loop in the main thread may replace the wakeup fd: the handler itself takes the signal then."""
    code = """
import os, signal, time
from bigtrain.train.preempt import PreemptionGuard
with PreemptionGuard() as guard:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(10)
"""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 75 and time.monotonic() - start < 5, result.stderr
    assert "preempted by SIGUSR1 at start-up; nothing new to save" in result.stderr
