"""parallel.compile under every strategy on ragged batches (classification: each batch padded to its own longest
example): the same losses as eager, and no recompile per step — padded batches compile with a variable length
(models/transformer.py; under fsdp and ZeRO-3 from the second length on), so `perf/compiled_graphs` stays flat
once train and eval have each run, and `bigtrain bench` reports no graph compiled in its measured steps."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_deepspeed import deepspeed_args
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
# seq_len 512: no example is cut, so every micro-batch has its own length (122, 88, 186, 512, … tokens)
RAGGED = {"task": {"name": "classification"}, "model": {"preset": "debug", "max_seq_len": 512},
          "data": {"source": "python-stdlib-docstrings", "max_documents": 300, "validation_split": 0.1,
                   "packing": False, "seq_len": 512},
          "train": {"max_steps": STEPS}, "eval": {"every": 3, "max_samples": 16}}


@pytest.fixture(scope="module")
def eager(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("eager")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(cache_dir, tmp / "runs", **RAGGED))
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    return recipe, read_metrics(tmp / "runs/tiny")[0]


@pytest.mark.parametrize("strategy", [["parallel.strategy=ddp"], ["parallel.strategy=fsdp"], deepspeed_args(3)],
                         ids=["ddp", "fsdp", "zero3"])
def test_compiled_training_equals_eager_without_recompiling_each_step(tmp_path, eager, strategy):
    recipe, want = eager
    result = run_torchrun(2, "train", str(recipe), f"run.output_dir={tmp_path}", "parallel.compile=true", *strategy)
    assert result.returncode == 0, result.stderr[-4000:]
    got = read_metrics(tmp_path / "tiny")[0]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(want, got, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), a["step"]
    graphs = [r["perf/compiled_graphs"] for r in got]
    # Three ragged training steps: one compile, or (fsdp, ZeRO-3: their hooks fix the first length) a second
    # with the length variable; then nothing new. The eval at step 3 compiles its own (no grad), once.
    assert graphs[0] > 0 and graphs[1] == graphs[2] <= 2 * graphs[0], graphs
    assert graphs[3:] == [graphs[3]] * 3, graphs


def test_bench_reports_no_recompile_in_its_measured_steps(eager):
    recipe, _ = eager
    bench = run_cli("bench", str(recipe), "parallel.compile=true", "--steps", "3", "--warmup", "2")
    assert bench.returncode == 0, bench.stderr[-4000:]
    line = re.search(r"compile\s+(\d+) graphs, (\d+) of them recompiled in the measured steps", bench.stdout)
    assert line and int(line[1]) > 0 and int(line[2]) == 0, bench.stdout
