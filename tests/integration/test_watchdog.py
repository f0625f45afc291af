"""The hang watchdog (bigtrain/train/watchdog.py) in a real job: 2 gloo ranks under torchrun, one sleeping inside a step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_recipe, write_recipe

pytestmark = pytest.mark.slow

FAULTY = REPO / "tests/integration/faulty.py"


def run_faulty_torchrun(nproc: int, fault: str, *args: str, timeout: int = 300) -> tuple[int, str, float]:
    """`torchrun … faulty.py ARGS` with BIGTRAIN_FAULT set: (exit code, stderr, seconds from the fault to the exit)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "BIGTRAIN_FAULT": fault}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(FAULTY), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines, fault_at = [], None
    try:
        for line in proc.stderr:  # timestamps as the lines arrive: when did the fault start?
            lines.append(line)
            if fault_at is None and line.startswith("faulty: "):
                fault_at = time.monotonic()
        code = proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert fault_at is not None, "".join(lines)[-3000:]
    return code, "".join(lines), time.monotonic() - fault_at


@pytest.mark.parametrize("where", ["watchdog", "collective timeout"])
def test_rank_sleeping_in_a_step_makes_every_rank_exit_naming_it(tmp_path, cache_dir, where):
    """Rank 1 sleeps 300 s in step 4's forward while rank 0 waits in the gradient all-reduce. Found by the step
    limit (hang_timeout_s=10) or by rank 0's collective timing out first (collective_timeout_s=5): either way both
    ranks dump their stacks, name rank 1 and exit 3 well within the timeout + 60 s."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", train={"max_steps": 6}))
    timeouts = (["parallel.hang_timeout_s=10"] if where == "watchdog" else
                ["parallel.hang_timeout_s=60", "parallel.collective_timeout_s=5"])
    code, stderr, took_s = run_faulty_torchrun(2, "sleep:rank=1:step=4:seconds=300", "train", str(recipe), *timeouts)
    limit_s = 10 if where == "watchdog" else 5

    assert code != 0
    assert took_s < limit_s + 60, stderr[-3000:]
    # Each rank exited by itself with the hang code (torchrun lists every failed rank with its exit code).
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: 3 ", stderr)) == ["0", "1"], stderr[-3000:]
    assert "rank(s) 1 did not arrive (last seen: rank 1 in step 4 'forward 1/1'" in stderr, stderr[-3000:]
    hang_dir = tmp_path / "runs/tiny/hang"
    rank0, rank1 = (hang_dir / "rank-0.txt").read_text(), (hang_dir / "rank-1.txt").read_text()
    for text in (rank0, rank1):  # both ranks' stderr lines may interleave; each file ends with its own summary
        assert text.splitlines()[-1].startswith("bigtrain: hang: ")
        assert "rank(s) 1 did not arrive (last seen: rank 1 in step 4 'forward 1/1'" in text.splitlines()[-1]
    assert "in sleep_in_forward" in rank1 and "faulty.py" in rank1  # the sleeping frame
    assert "position: step 4, phase 2 'forward 1/1'" in rank1
    assert "'backward 1/1 + gradient all-reduce'" in rank0  # rank 0 got further and waits for rank 1
    for text in (rank0, rank1):
        assert "Python stacks, every thread" in text
    if where == "collective timeout":
        assert "a collective timed out after parallel.collective_timeout_s=5 s on rank 0" in rank0


def test_rank_stalling_before_the_final_barrier_gets_a_report_naming_the_collective(tmp_path, cache_dir):
    """Outside the loop too: rank 1 sleeps 300 s before the final barrier while rank 0 waits in it. Within
    collective_timeout_s (20 s; hang_timeout_s=5) both ranks report, name rank 1 as behind and rank 0's barrier,
    and exit 3."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", train={"max_steps": 2}))
    code, stderr, took_s = run_faulty_torchrun(2, "stall:rank=1:at=final-barrier:seconds=300", "train", str(recipe),
                                               "parallel.hang_timeout_s=5", "parallel.collective_timeout_s=20")
    assert code != 0
    assert took_s < 20 + 40, stderr[-3000:]
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: 3 ", stderr)) == ["0", "1"], stderr[-3000:]
    rank0 = (tmp_path / "runs/tiny/hang/rank-0.txt").read_text()
    last = rank0.splitlines()[-1]
    assert "rank(s) 1 did not arrive (last seen: rank 1 in step 2 'final barrier'" in last, rank0[-3000:]
    assert "waiting for them: rank 0 in barrier for " in last
    assert "bigtrain collective: barrier for " in rank0
    assert "in stalled" in (tmp_path / "runs/tiny/hang/rank-1.txt").read_text()  # faulty.py's sleeping frame
