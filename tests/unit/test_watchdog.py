"""Tests for bigtrain/train/watchdog.py's pure parts: step limits, positions, naming late ranks (CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as torch_dist

import torch

from bigtrain.parallel.dist import CollectiveNote
from bigtrain.train.watchdog import (EXIT_HANG, MIN_TIMED_STEPS, Progress, is_collective_timeout, late_ranks, limit_cap, position,
                               stall, summary)


def report(rank: int, step: int, seq: int, phase: str = "forward 1/1", stalled_s: float = 12.0, collectives: int = 0,
           collective: str | None = None) -> dict:
    return {"rank": rank, "step": step, "seq": seq, "phase": phase, "host": "node7", "pid": 1, "stalled_s": stalled_s,
            "collectives": collectives, "collective": collective}


def test_progress_counts_phases_per_step_and_times_steps_after_the_first():
    p = Progress()
    for step in (1, 2, 3):
        p.start_step(step)
        p.enter("all-reduce target counts")
        p.enter("forward 1/1")
        assert p.mark[:3] == (step, 2, "forward 1/1") and p.mark[4] is not None
        p.end_step()
        assert p.mark[:3] == (step, 3, "log") and p.mark[4] is None  # between steps
    assert len(p.step_times_s) == 2  # step 1 (warm-up) is not timed
    assert [(s, phase) for s, phase, _ in p.recent][-4:] == [(3, "fetch batches"), (3, "all-reduce target counts"),
                                                              (3, "forward 1/1"), (3, "log")]


def test_a_step_is_hung_past_the_floor_or_the_median_times_the_factor_whichever_is_later():
    times = [1.0, 1.2, 0.8]  # median 1.0
    in_step = (7, 2, "forward 1/1", 100.0, 95.0)  # the step started at 95, the phase at 100
    stalled, limit, how = stall(in_step, times, 110.0, floor_s=10, factor=5, long_s=1800)
    assert (stalled, limit) == (15.0, 10)  # counted from the step's start; 5 × 1 s < the 10 s floor
    assert "parallel.hang_timeout_s=10" in how and "median step 1 s" in how
    _, limit, _ = stall(in_step, [30.0, 40.0, 50.0], 110.0, floor_s=10, factor=5, long_s=1800)
    assert limit == 200  # slow steps: 5 × the 40 s median


def test_first_steps_and_phases_between_steps_get_the_collective_timeout():
    first = (1, 2, "forward 1/1", 100.0, 95.0)
    stalled, limit, how = stall(first, [1.0] * (MIN_TIMED_STEPS - 1), 130.0, floor_s=10, factor=5, long_s=1800)
    assert (stalled, limit) == (30.0, 1800) and "first steps" in how  # counted from the phase (compile may be slow)
    between = (7, 9, "checkpoint save", 100.0, None)
    stalled, limit, how = stall(between, [1.0] * 10, 160.0, floor_s=10, factor=5, long_s=1800)
    assert (stalled, limit) == (60.0, 1800) and "between steps" in how


def test_the_ranks_at_the_lowest_position_are_late_and_silent_ranks_are_missing():
    reports = {0: report(0, 4, 3), 1: report(1, 4, 2), 2: report(2, 4, 3)}
    assert late_ranks(reports, 4) == ([1], [3])
    assert late_ranks({0: report(0, 5, 1), 1: report(1, 4, 9, "log")}, 2) == ([1], [])  # still in the step before
    assert late_ranks({0: report(0, 4, 3), 1: report(1, 4, 3)}, 2) == ([], [])  # all at the same place


def test_summary_names_the_late_ranks_and_where_they_were_last_seen():
    line = summary("step 4 did not finish within 10 s", {0: report(0, 4, 3), 1: report(1, 4, 2)}, 3, Path("/r/hang"))
    assert line == ("bigtrain: hang: step 4 did not finish within 10 s — rank(s) 1, 2 did not arrive (last seen: "
                    "rank 1 in step 4 'forward 1/1' for 12 s on node7; rank 2 sent no report (gone, or stuck in a call "
                    f"that holds the GIL)); stacks in /r/hang/rank-N.txt; exit code {EXIT_HANG}")
    same = summary("x", {0: report(0, 4, 3, "all-reduce loss"), 1: report(1, 4, 3, "all-reduce loss")}, 2, Path("h"))
    assert "every rank is in step 4 'all-reduce loss': none is behind" in same


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"), True),
    (torch_dist.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"), True),
    (RuntimeError("Connection closed by peer [127.0.0.1]:47498"), False),
    (ValueError("timed out"), False),
])
def test_collective_timeouts_are_told_from_other_errors(error, expected):
    assert is_collective_timeout(error) is expected


def test_outside_a_timed_step_a_finished_collective_is_progress():
    """Ranks waiting for rank 0's data preparation meet in an all-reduce every second: not a stall."""
    build = (0, 1, "build: data, model, engine", 100.0, None)
    stalled, limit, _ = stall(build, [], 2000.0, floor_s=10, factor=5, long_s=1800, progress_at=1999.0)
    assert (stalled, limit) == (1.0, 1800)
    assert stall(build, [], 2000.0, floor_s=10, factor=5, long_s=1800)[0] == 1900.0
    assert position(build) == "'build: data, model, engine' before the loop"
    assert position((8, 30, "final barrier", 0.0, None)) == "'final barrier' after step 8"
    assert position((4, 2, "forward 1/1", 0.0, 1.0)) == "step 4 'forward 1/1'"


def test_on_cuda_every_limit_stays_below_the_nccl_timeout():
    """NCCL aborts the process at parallel.collective_timeout_s: the watchdog's report must come first there."""
    cap = limit_cap("cuda", 1800, 5.0)
    assert cap == 1800 - 90  # 5 % margin (more than two polls)
    assert limit_cap("cuda", 60, 5.0) == 50  # two polls' margin
    assert limit_cap("cpu", 1800, 5.0) is None  # gloo raises its timeout, which the watchdog diagnoses
    between = (7, 9, "checkpoint save", 100.0, None)
    _, limit, how = stall(between, [], 160.0, floor_s=10, factor=5, long_s=1800, cap_s=cap)
    assert limit == cap and "capped below parallel.collective_timeout_s=1800" in how
    in_step = (7, 2, "forward 1/1", 100.0, 95.0)
    _, limit, _ = stall(in_step, [400.0] * 3, 110.0, floor_s=3000, factor=5, long_s=1800, cap_s=cap)
    assert limit == cap  # a hang_timeout_s above NCCL's timeout is lowered too
    _, limit, _ = stall(in_step, [1.0] * 3, 110.0, floor_s=300, factor=5, long_s=1800, cap_s=cap)
    assert limit == 300  # below the cap: unchanged


def test_a_rank_not_yet_in_the_collective_the_others_wait_in_is_behind_and_the_collective_is_named():
    reports = {0: report(0, 8, 30, "final barrier", collectives=41, collective="barrier for 20 s"),
               1: report(1, 8, 30, "final barrier", collectives=40)}
    assert late_ranks(reports, 2) == ([1], [])
    line = summary("x", reports, 2, Path("h"))
    assert "rank(s) 1 did not arrive (last seen: rank 1 in step 8 'final barrier'" in line
    assert "; waiting for them: rank 0 in barrier for 20 s;" in line
    both = {r: report(r, 8, 30, "final barrier", collectives=41, collective="barrier for 20 s") for r in (0, 1)}
    assert "every rank is in step 8 'final barrier' (barrier for 20 s): none is behind" in summary("x", both, 2, Path("h"))


def test_collective_note_names_the_operation_and_size_while_in_it():
    note = CollectiveNote()
    with note.entered("all_reduce SUM", torch.zeros(3, dtype=torch.float64)):
        assert note.current[0] == "all_reduce SUM of 3 float64 (24 B) on cpu"
        assert note.entered_count == 1
    assert note.current is None
    with pytest.raises(RuntimeError):
        with note.entered("barrier"):
            raise RuntimeError("Timed out waiting 20000ms")
    assert note.current[0] == "barrier" and note.entered_count == 2  # kept for the timeout's diagnosis
