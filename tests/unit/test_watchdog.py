"""Tests for bigtrain/watchdog.py's pure parts: step limits, positions, naming late ranks (CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as torch_dist

from bigtrain.watchdog import EXIT_HANG, MIN_TIMED_STEPS, Progress, is_collective_timeout, late_ranks, stall, summary


def report(rank: int, step: int, seq: int, phase: str = "forward 1/1", stalled_s: float = 12.0) -> dict:
    return {"rank": rank, "step": step, "seq": seq, "phase": phase, "host": "node7", "pid": 1, "stalled_s": stalled_s}


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
