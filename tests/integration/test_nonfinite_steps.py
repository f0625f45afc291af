"""A non-finite step is skipped identically under every strategy: NaN injected on one rank only.

tests/integration/faulty.py multiplies one rank's loss by NaN at one step (NaN loss and gradients there);
the all-reduced loss and the synced gradients carry it to every rank, and every strategy must skip that
update on every rank — DeepSpeed included, which takes the skip decision inside its own step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_recipe, write_recipe
from tests.integration.test_deepspeed import deepspeed_args, final_weights
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

FAULTY = REPO / "tests/integration/faulty.py"
STEPS, NAN_STEP = 3, 2


def run_faulty(fault: str, *args: str, nproc: int = 0) -> None:
    """`faulty.py ARGS` with BIGTRAIN_FAULT set: one process, or `nproc` under torchrun (gloo)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "BIGTRAIN_FAULT": fault}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    result = subprocess.run([sys.executable, *launch, str(FAULTY), *args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def skipped_single(tmp_path_factory, cache_dir):
    """One process, NaN at step 2: the reference every strategy must equal."""
    tmp = tmp_path_factory.mktemp("nan")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(cache_dir, tmp / "runs", train={"max_steps": STEPS}))
    run_faulty(f"nan:rank=0:step={NAN_STEP}", "train", str(recipe), "run.name=single")
    return recipe, tmp / "runs/single"


@pytest.mark.parametrize("strategy", [["parallel.strategy=ddp"], ["parallel.strategy=fsdp"], deepspeed_args(1),
                                      deepspeed_args(2), deepspeed_args(3)], ids=["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_nan_on_one_rank_skips_the_step_on_every_rank_like_one_process(tmp_path, skipped_single, strategy):
    recipe, single_dir = skipped_single
    run_faulty(f"nan:rank=1:step={NAN_STEP}", "train", str(recipe), "run.name=two", f"run.output_dir={tmp_path}",
               *strategy, nproc=2)
    got = {r["step"]: r for r in read_metrics(tmp_path / "two")[0]}
    want = {r["step"]: r for r in read_metrics(single_dir)[0]}
    assert [got[s]["train/skipped_steps"] for s in range(1, STEPS + 1)] == [0, 1, 1]
    assert [want[s]["train/skipped_steps"] for s in range(1, STEPS + 1)] == [0, 1, 1]
    for step in (1, STEPS):  # the steps either side of the skipped one train exactly like one process
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=1e-5), step
    a, b = final_weights(tmp_path / "two", step=STEPS), final_weights(single_dir, step=STEPS)
    assert sorted(a) == sorted(b)
    for key in b:  # no NaN reached the weights, and the skipped step left no trace (Adam's step count included)
        assert torch.isfinite(a[key]).all(), key
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-4, msg=key)
