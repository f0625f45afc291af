"""At most one blocking host read per training step that is not a log or checkpoint step (issue: the loop at
accelerator speed), counted by tests/integration/count_syncs.py around a real `bigtrain train` under single,
ddp × 2, fsdp × 2 and DeepSpeed ZeRO-3 × 2. DeepSpeed's optimizer decides on the host whether the step overflowed
(its own reads, inside deepspeed and not counted): bigtrain's code around it is held to the same one read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY = 8, 4


@pytest.mark.parametrize("strategy, nproc", [("single", 0), ("ddp", 2), ("fsdp", 2), ("deepspeed", 2)])
def test_a_step_that_logs_nothing_reads_the_device_at_most_once(tmp_path, cache_dir, strategy, nproc):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": STEPS}, logging={"every": LOG_EVERY, "progress": False,
                                                                             "curves": False},
        eval={"every": 0, "max_samples": 16}, optim={"lr": 3e-3, "warmup_steps": 2, "ema_decay": 0.9},
        parallel={"precision": "fp32", "strategy": strategy, **({"zero_stage": 3} if strategy == "deepspeed" else {})}))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "BIGTRAIN_COUNT_SYNCS": "1"}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    result = subprocess.run([sys.executable, *launch, str(REPO / "tests/integration/count_syncs.py"), "train",
                             str(recipe)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "runs/tiny"
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == [4, 8] and all(r["train/loss"] > 0 for r in records)
    for rank in range(max(nproc, 1)):
        counts = {int(k): v for k, v in json.loads((run_dir / f"syncs-rank-{rank}.json").read_text()).items()}
        quiet = {step: counts.get(step, 0) for step in range(1, STEPS + 1) if step % LOG_EVERY}
        assert max(quiet.values()) <= 1, (rank, counts)  # CPU AdamW reads the finite flag: one per step
        assert counts[LOG_EVERY] > 1, (rank, counts)  # the log step reads loss, norm and flags: the counter counts
