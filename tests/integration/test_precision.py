"""`parallel.precision: auto` and CPU speed truths, driven through the CLI: an AVX2-class CPU trains in fp32 and says
why; an explicit bf16 there warns with the measured slowdown; a warmup longer than the run trains; MFU never
exceeds 1 even from a wrong cached peak; every rank of a job takes rank 0's resolution.

"An AVX2-class CPU" is this machine with torch's and oneDNN's kernels capped at AVX2 (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2): bf16 matmuls then run as slowly as on a real AVX2 CPU, and on one the caps change nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def train(tmp_path, cache_dir, name: str, *overrides: str, env: dict, **sections):
    recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(cache_dir, tmp_path / "runs", **sections))
    return run_cli("train", str(recipe), f"run.name={name}", *overrides, env=env), tmp_path / "runs" / name


def test_auto_on_an_avx2_cpu_trains_in_fp32_a_warmup_longer_than_the_run_and_keeps_mfu_at_most_1(tmp_path, cache_dir):
    env = {**AVX2, "XDG_CACHE_HOME": str(tmp_path / "xdg")}  # a peak cache of this test's own
    result, run_dir = train(tmp_path, cache_dir, "auto", "train.max_steps=3", env=env,
                            parallel={"precision": "auto"}, optim={"lr": 1e-3, "warmup_steps": 5, "schedule": "cosine"})
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "precision auto → fp32: this CPU has no native bf16 matmul (torch CPU capability AVX2)" in lines
    table = json.loads((run_dir / "precision.json").read_text())
    assert (table["requested"], table["name"], table["compute"]) == ("auto", "fp32", "float32")
    assert table["reason"] == "this CPU has no native bf16 matmul (torch CPU capability AVX2)"
    assert "parallel:\n  strategy: auto\n  precision: auto\n" in (run_dir / "config.yaml").read_text()  # resolves anew on resume
    # warmup 5 > max_steps 3: a warning, and the LR follows the warmup as written (never reaching its peak).
    assert ("warning: optim.warmup_steps=5 exceeds train.max_steps=3: the LR rises along the warmup and stops at "
            "0.0006, never reaching optim.lr=0.001") in lines
    records, _ = read_metrics(run_dir)
    assert [r["train/lr"] for r in records] == pytest.approx([2e-4, 4e-4, 6e-4])
    peak_line = next(line for line in lines if line.startswith("MFU peak "))
    assert re.fullmatch(r"MFU peak [\d,]+ GFLOP/s per device, measured \(float32 linear, cached in .*\)", peak_line)

    # A cached peak below what the model achieves (as the old torch.mm measurement cached for bf16) is wrong:
    # the run measures again, replaces it, and MFU stays ≤ 1.
    cache_file = tmp_path / "xdg/bigtrain/peak_flops.json"
    cache = json.loads(cache_file.read_text())
    cache_file.write_text(json.dumps(dict.fromkeys(cache, 1e3)))
    result, run_dir = train(tmp_path, cache_dir, "wrong-peak", "train.max_steps=3", env=env)
    assert result.returncode == 0, result.stderr
    assert "MFU peak 0 GFLOP/s per device" in result.stderr
    assert "bigtrain: this run went faster than the MFU peak; now peak" in result.stderr
    records, _ = read_metrics(run_dir)
    assert len(records) == 3 and all(0 < r["perf/mfu"] <= 1 for r in records), [r["perf/mfu"] for r in records]
    assert all(value > 1e6 for value in json.loads(cache_file.read_text()).values())


def test_explicit_bf16_on_an_avx2_cpu_runs_with_a_warning_of_the_measured_slowdown(tmp_path, cache_dir):
    env = {**AVX2, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result, run_dir = train(tmp_path, cache_dir, "bf16", "train.max_steps=2", env=env, parallel={"precision": "bf16"})
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "parallel.precision=bf16 but" in line]
    assert len(warning) == 1, result.stderr
    match = re.fullmatch(r"warning: parallel\.precision=bf16 but this CPU has no native bf16 matmul \(torch CPU "
                         r"capability AVX2\): bf16 matmuls measured ([\d.]+)× slower than fp32 here — set "
                         r"parallel\.precision=auto \(or fp32\) to train at full speed", warning[0])
    assert match and float(match.group(1)) >= 1.2, warning[0]
    assert json.loads((run_dir / "precision.json").read_text())["compute"] == "bfloat16"  # it still runs bf16
    # `bigtrain check` says the same for this machine, before anything runs.
    check = run_cli("check", str(tmp_path / "bf16.yaml"), env=env)
    assert check.returncode == 0 and warning[0].split(" measured ")[0] in check.stdout, check.stdout


def test_check_shows_what_auto_resolves_to_on_this_machine(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {})
    result = run_cli("check", str(recipe), env=AVX2)
    assert result.returncode == 0, result.stderr
    assert "precision    auto → fp32: this CPU has no native bf16 matmul (torch CPU capability AVX2)" in result.stdout


PROBE = textwrap.dedent("""
    import json
    import sys
    from bigtrain.core.hardware import CpuInfo
    from bigtrain.parallel import init_distributed, shutdown
    from bigtrain.parallel.precision import resolve_job_precision

    dist = init_distributed("cpu")
    # Rank 0 sits on an AVX2 node, rank 1 on a node with native bf16: alone they would disagree.
    mine = (CpuInfo("x86_64", frozenset({"avx2"}), "AVX2", None) if dist.rank == 0 else
            CpuInfo("x86_64", frozenset({"avx2", "avx512f", "amx_bf16"}), "AVX512", None))
    resolved = resolve_job_precision(dist, "auto", probe=lambda: mine)
    with open(sys.argv[1] + f"/rank-{dist.rank}.json", "w") as f:  # a file each: stdout lines of two ranks interleave
        json.dump({"rank": dist.rank, "name": resolved.name, "reason": resolved.reason}, f)
    shutdown(dist)
""")


def test_every_rank_takes_rank_0s_resolution(tmp_path):
    from bigtrain.core.hardware import CpuInfo
    from bigtrain.parallel.precision import resolve_precision

    assert resolve_precision("auto", "cpu", cpu=CpuInfo("x86_64", frozenset({"amx_bf16"}), "AVX512", None)).name == "bf16"
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    reason = "this CPU has no native bf16 matmul (torch CPU capability AVX2)"
    assert reports == [{"rank": 0, "name": "fp32", "reason": reason}, {"rank": 1, "name": "fp32", "reason": reason}]
