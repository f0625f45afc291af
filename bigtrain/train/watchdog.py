"""Hang diagnosis: when a rank stops making progress, every rank says where it is and the job exits naming the late ranks.

The watchdog is armed from the process group's creation to the exit (build, init_from, resume, the loop, the
final barrier). The run and the loop mark where they are on a `Progress` (a tuple assignment per phase: no I/O,
no collective); bigtrain's own collectives note what they are on `Dist.collectives` (parallel/dist.py). With
several processes a `Watchdog` thread per rank wakes every few seconds and compares the time since the step
started with the limit, max(`parallel.hang_timeout_s`, `parallel.hang_step_factor` × the running median step
time). The first steps (warm-up, compile), eval, checkpoints and the phases outside the loop may take up to
`parallel.collective_timeout_s` per phase instead (a finished collective counts as progress). On CUDA every
limit stays below `parallel.collective_timeout_s`, so this diagnosis comes before NCCL's timeout aborts the
process. A collective that raises a timeout counts as a hang too.

On a hang each rank publishes its position (step, how many phases into it, phase name) to the job's c10d store —
the TCPStore the process group was made on (torchrun's agent store or rank 0's), which answers while every
process group is stuck — and raises a flag there, so the other ranks (stalled too, and checking the flag
once a step has stalled a few seconds) report at once. Each rank writes its last phases and every thread's Python stack to stderr and
RUN/hang/rank-N.txt (on CUDA also the NCCL flight recorder, nccl-trace-rank-N.pkl), waits for the others'
reports, prints which ranks are behind (or sent nothing), and exits with EXIT_HANG. No rank exits before
every reporting rank has dumped, so a launcher that kills the rest on the first exit loses nothing.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from bigtrain.core.errors import say

EXIT_HANG = 3  # a rank stopped making progress; RUN/hang/ has every rank's stacks
HANG_DIR = "hang"
MIN_TIMED_STEPS = 2  # the median step time counts from this many steps (a process's first step is not timed)
_STEP_WINDOW = 50  # the median is over the last this many steps
_RECENT = 32  # phases kept for the report
_GRACE_S = 15.0  # how long a reporting rank waits for the others' reports (they check the flag every poll_s)


class Progress:
    """Where this rank's loop is. `mark` is one tuple (step, seq, phase, since, step_start) replaced whole, so the
    watchdog thread always reads a consistent one; seq counts the phases entered since the step started, and
    every rank enters the same phases in the same order, so (step, seq) compares positions across ranks.
    step_start is None between steps (log, eval, checkpoint)."""

    def __init__(self):
        self.mark: tuple = (0, 0, "start-up", time.monotonic(), None)
        self.recent: deque = deque(maxlen=_RECENT)  # (step, phase, monotonic time entered)
        self.step_times_s: deque = deque(maxlen=_STEP_WINDOW)
        self._steps_started = 0

    def start_step(self, step: int) -> None:
        self._steps_started += 1
        now = time.monotonic()
        self.mark = (step, 0, "fetch batches", now, now)
        self.recent.append((step, "fetch batches", now))

    def enter(self, phase: str) -> None:
        step, seq, _, _, step_start = self.mark
        now = time.monotonic()
        self.mark = (step, seq + 1, phase, now, step_start)
        self.recent.append((step, phase, now))

    def end_step(self) -> None:
        """The step's work is done (the optimizer stepped); what follows until the next step is not step time."""
        step, seq, _, _, step_start = self.mark
        now = time.monotonic()
        if step_start is not None and self._steps_started > 1:  # the first step warms up (allocations, compile)
            self.step_times_s.append(now - step_start)
        self.mark = (step, seq + 1, "log", now, None)
        self.recent.append((step, "log", now))


def position(mark: tuple) -> str:
    """A Progress mark as words: "step 4 'forward 1/1'", "'eval batch 2/9' after step 4", "'resume' before the loop"."""
    step, _, phase, _, step_start = mark
    if step_start is not None:
        return f"step {step} '{phase}'"
    return f"'{phase}' after step {step}" if step else f"'{phase}' before the loop"


def stall(mark: tuple, step_times_s: list[float], now: float, *, floor_s: float, factor: float,
          long_s: float, progress_at: float = 0.0, cap_s: float | None = None) -> tuple[float, float, str]:
    """(seconds without progress, the limit, how the limit was set) for a Progress mark.

    Inside a step, once MIN_TIMED_STEPS steps are timed: since the step started, against
    max(floor_s, factor × median step time). Before that, and between steps (eval, checkpoint, the phases outside
    the loop): since the phase started or `progress_at` (a finished collective), whichever is later, against
    max(floor_s, long_s). `cap_s`: no limit is above it (on CUDA, below NCCL's own timeout)."""
    _, _, _, since, step_start = mark
    if step_start is not None and len(step_times_s) >= MIN_TIMED_STEPS:
        median = statistics.median(step_times_s)
        stalled_s, limit = now - step_start, max(floor_s, factor * median)
        how = (f"max(parallel.hang_timeout_s={floor_s:g}, parallel.hang_step_factor={factor:g}"
               f" × median step {median:.3g} s)")
    else:
        what = "the first steps" if step_start is not None else "a phase between steps"
        stalled_s, limit, how = now - max(since, progress_at), max(floor_s, long_s), f"parallel.collective_timeout_s for {what}"
    if cap_s is not None and limit > cap_s:
        return stalled_s, cap_s, f"{how}, capped below parallel.collective_timeout_s={long_s:g} (NCCL's timeout)"
    return stalled_s, limit, how


def limit_cap(device_type: str, collective_timeout_s: float, poll_s: float) -> float | None:
    """On CUDA the highest limit the watchdog may use: NCCL aborts a process whose collective runs past
    parallel.collective_timeout_s, so bigtrain's report must come first (a margin of two polls, at least 5 %).
    Elsewhere None: gloo raises its timeout as an exception, which the watchdog diagnoses."""
    if device_type != "cuda":
        return None
    return max(poll_s, collective_timeout_s - max(2 * poll_s, 0.05 * collective_timeout_s))


def late_ranks(reports: dict[int, dict], world_size: int) -> tuple[list[int], list[int]]:
    """(ranks behind the others, ranks that sent no report). Behind: at the lowest (step, seq) when not every
    reporting rank is at the same position — the others are waiting for them in a collective."""
    missing = [r for r in range(world_size) if r not in reports]
    # bigtrain's collectives entered break ties: a rank not yet in the collective the others wait in is behind
    positions = {r: (rep["step"], rep["seq"], rep.get("collectives", 0)) for r, rep in reports.items()}
    if len(set(positions.values())) <= 1:
        return [], missing
    lowest = min(positions.values())
    return sorted(r for r, p in positions.items() if p == lowest), missing


def summary(reason: str, reports: dict[int, dict], world_size: int, hang_dir: Path) -> str:
    """The one line every rank prints last: what happened and which ranks did not arrive."""
    behind, missing = late_ranks(reports, world_size)
    if behind or missing:
        seen = [f"rank {r} in step {reports[r]['step']} '{reports[r]['phase']}' for {reports[r]['stalled_s']:.0f} s "
                f"on {reports[r]['host']}" for r in behind]
        seen += [f"rank {r} sent no report (gone, or stuck in a call that holds the GIL)" for r in missing]
        who = f"rank(s) {', '.join(str(r) for r in sorted(behind + missing))} did not arrive (last seen: {'; '.join(seen)})"
        waiting = [f"rank {r} in {rep['collective']}" for r, rep in sorted(reports.items())
                   if rep.get("collective") and r not in behind]
        if waiting:
            who += f"; waiting for them: {'; '.join(waiting)}"
    elif reports:
        r = min(reports)
        collective = f" ({reports[r]['collective']})" if reports[r].get("collective") else ""
        who = (f"every rank is in step {reports[r]['step']} '{reports[r]['phase']}'{collective}: none is behind, so a "
               f"collective never completed (network, NCCL) — see the stacks")
    else:
        who = "no rank's report could be read (the c10d store is unreachable) — see the stacks"
    return f"bigtrain: hang: {reason} — {who}; stacks in {hang_dir}/rank-N.txt; exit code {EXIT_HANG}"


def is_collective_timeout(error: BaseException) -> bool:
    """gloo raises RuntimeError('... Timed out waiting ...'); NCCL (blocking wait) DistBackendError('... timeout ...')."""
    import torch.distributed as torch_dist

    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or (
        isinstance(error, torch_dist.DistBackendError) and "timeout" in text))


def enable_flight_recorder(run_dir: Path) -> None:
    """On CUDA, before the process group exists: NCCL records each rank's last collectives and dumps them to
    RUN/hang/nccl-trace-rank-N when a collective times out (read with `python -m torch.distributed.flight_recorder`).
    Settings already in the environment win."""
    import torch

    if not torch.cuda.is_available():
        return
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(Path(run_dir) / HANG_DIR / "nccl-trace-rank-"))


class Watchdog:
    """`start()` once the process group exists, `diagnose_error(e)` for an exception on the way out and `stop()`
    at the end (or `with Watchdog(parallel_cfg, dist, progress, run_dir):`). Off on one process or with
    parallel.hang_timeout_s=0. A hang (or a collective timeout raised while armed) ends the process with EXIT_HANG."""

    def __init__(self, parallel, dist, progress: Progress, run_dir: Path):
        self.dist, self.progress = dist, progress
        self.floor_s, self.factor = parallel.hang_timeout_s, parallel.hang_step_factor
        self.long_s = parallel.collective_timeout_s
        self.hang_dir = Path(run_dir) / HANG_DIR
        self.enabled = dist.distributed and self.floor_s > 0
        self.poll_s = min(5.0, max(0.5, self.floor_s / 10))
        self.cap_s = limit_cap(dist.device.type, self.long_s, self.poll_s)
        self.store = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._firing = False
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.dist.distributed and self.dist.device.type == "cuda":
            self.hang_dir.mkdir(parents=True, exist_ok=True)  # where NCCL's own timeout dump goes
        if self.enabled:
            if self.cap_s is not None and self.floor_s > self.cap_s and self.dist.is_main:
                say(f"bigtrain: warning: parallel.hang_timeout_s={self.floor_s:g} is not below "
                    f"parallel.collective_timeout_s={self.long_s:g} (NCCL's timeout): the hang watchdog uses "
                    f"{self.cap_s:g} s so that its report comes first")
            self.store = _hang_store(self.dist)
            self._thread = threading.Thread(target=self._watch, name="bigtrain-watchdog", daemon=True)
            self._thread.start()
        return self

    @property
    def firing(self) -> bool:
        """Whether this process is writing its hang report (and will exit EXIT_HANG)."""
        return self._firing

    def diagnose_error(self, exc: BaseException) -> None:
        """An exception on its way out: a collective timeout, or a peer's hang report that broke our collective,
        is diagnosed (and the process exits EXIT_HANG); anything else returns."""
        if not self.enabled:
            return
        if is_collective_timeout(exc):
            collective = self.dist.collectives.current
            self.diagnose(f"a collective timed out after parallel.collective_timeout_s={self.long_s:g} s on "
                          f"rank {self.dist.rank} in {position(self.progress.mark)}"
                          + (f", in {collective[0]}" if collective else ""))
        if self._firing:  # the thread is reporting: whatever broke here, let it finish and exit
            self.diagnose("")
        flag = self._flag() if isinstance(exc, RuntimeError) else None
        if flag is not None:  # a peer found a hang and its exit broke our collective
            self.diagnose(flag)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.diagnose_error(exc)
        self.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            mark = self.progress.mark
            stalled_s, limit_s, how = stall(mark, list(self.progress.step_times_s), now, floor_s=self.floor_s,
                                            factor=self.factor, long_s=self.long_s,
                                            progress_at=self.dist.collectives.finished_at, cap_s=self.cap_s)
            if stalled_s > limit_s:
                step, _, _, _, in_step = mark
                what = f"step {step}" if in_step is not None else position(mark)
                collective = self.dist.collectives.current
                self.diagnose(f"{what} did not finish within {limit_s:g} s on rank {self.dist.rank}"
                              + (f", in {collective[0]}" if collective else "") + f" ({how})")
            elif stalled_s > self.poll_s:  # stalled a while: has another rank found a hang? (no store traffic otherwise)
                flag = self._flag()
                if flag is not None:
                    self.diagnose(flag)

    def _flag(self) -> str | None:
        try:
            return self.store.get("flag").decode() if self.store is not None and self.store.check(["flag"]) else None
        except Exception:  # store gone or slow: the own deadline still applies
            return None

    def diagnose(self, reason: str) -> None:
        """Report, dump, wait for the other ranks' reports, print the summary and exit EXIT_HANG. Never returns."""
        with self._lock:
            firing, self._firing = self._firing, True
        if firing:  # the other thread is already on it and will end the process
            threading.Event().wait()
        try:
            self._report_and_exit(reason)
        except BaseException:  # a failing report must not keep the process alive
            traceback.print_exc()
        finally:
            os._exit(EXIT_HANG)

    def _report_and_exit(self, reason: str) -> None:
        rank, world = self.dist.rank, self.dist.world_size
        step, seq, phase, since, step_start = self.progress.mark
        now = time.monotonic()
        note = self.dist.collectives
        collective = note.current
        me = {"rank": rank, "step": step, "seq": seq, "phase": phase, "host": socket.gethostname(), "pid": os.getpid(),
              "stalled_s": now - (step_start if step_start is not None else since), "collectives": note.entered_count,
              "collective": f"{collective[0]} for {now - collective[1]:.0f} s" if collective else None}
        self._store_call(lambda s: s.check(["flag"]) or s.set("flag", f"rank {rank} reported: {reason}"))
        self._store_call(lambda s: s.append("reports", json.dumps(me) + "\n"))
        reported = self._store_call(lambda s: s.add("reported", 1))

        header = [f"bigtrain hang report · rank {rank} of {world} · {me['host']} pid {me['pid']} · "
                  f"{datetime.datetime.now().isoformat(timespec='seconds')}",
                  f"reason: {reason}",
                  f"position: step {step}, phase {seq} '{phase}', no progress for {me['stalled_s']:.1f} s",
                  f"bigtrain collective: {me['collective'] or 'none'} (collective {note.entered_count} of this process)",
                  "last phases entered (oldest first):"]
        header += [f"  step {s:>7}  {p:<40} {now - t:8.1f} s ago" for s, p, t in list(self.progress.recent)]
        text = "\n".join(header) + "\nPython stacks, every thread (most recent call first):\n"
        path = self.hang_dir / f"rank-{rank}.txt"
        dump = None
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            dump = open(path, "w")
            dump.write(text)
            dump.flush()
            faulthandler.dump_traceback(file=dump, all_threads=True)
        except OSError as e:
            print(f"bigtrain: could not write {path}: {e}", file=sys.stderr, flush=True)
        sys.stderr.write(text)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        _dump_nccl_trace(self.dist, self.hang_dir)

        # Everyone else is stalled too and sees the flag within poll_s: wait for their reports (bounded).
        deadline = time.monotonic() + _GRACE_S + 2 * self.poll_s
        while reported is not None and reported < world and time.monotonic() < deadline:
            time.sleep(0.2)
            reported = self._store_call(lambda s: s.add("reported", 0))
        reports = {}
        raw = self._store_call(lambda s: s.get("reports"))
        for line in (raw or b"").decode().splitlines():
            rep = json.loads(line)
            reports[rep["rank"]] = rep
        reports.setdefault(rank, me)
        line = summary(reason, reports, world, self.hang_dir)
        if dump is not None:
            dump.write(line + "\n")
            dump.close()
        say(line)

        # Exit together: a launcher that kills the rest on the first exit must not cut a rank's dump short.
        done = self._store_call(lambda s: s.add("done", 1))
        deadline = time.monotonic() + 10
        while done is not None and done < len(reports) and time.monotonic() < deadline:
            time.sleep(0.2)
            done = self._store_call(lambda s: s.add("done", 0))

    def _store_call(self, fn):
        if self.store is None:
            return None
        try:
            return fn(self.store)
        except Exception as e:  # an unreachable store leaves a local diagnosis
            print(f"bigtrain: hang report: c10d store: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
            self.store = None
            return None


def _hang_store(dist):
    """The job's c10d store (dist.py made the process group on it: torchrun's agent store, or rank 0's) under a
    bigtrain prefix, or None (reports then stay local)."""
    import torch.distributed as torch_dist

    if dist.store is None:
        print("bigtrain: warning: hang reports stay local (no c10d store from bigtrain's process-group setup)",
              file=sys.stderr, flush=True)
        return None
    return torch_dist.PrefixStore("bigtrain/hang/", dist.store)


def _dump_nccl_trace(dist, hang_dir: Path) -> None:
    """On CUDA: this rank's NCCL flight recorder (its last collectives) as nccl-trace-rank-N.pkl, when torch has one."""
    if dist.device.type != "cuda":
        return
    try:
        import torch

        # no public API yet (nor in torch's stubs); absent in builds without NCCL
        dump = torch._C._distributed_c10d._dump_nccl_trace  # type: ignore[attr-defined]
        (hang_dir / f"nccl-trace-rank-{dist.rank}.pkl").write_bytes(dump())
    except Exception as e:
        print(f"bigtrain: no NCCL flight recorder dump ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr, flush=True)
