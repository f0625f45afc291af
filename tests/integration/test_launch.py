"""Real launches on CPU (gloo): `bigtrain launch` under torchrun and the deepspeed launcher, `accelerate launch`,
two simulated nodes on 127.0.0.1, and the preflight/timeout diagnoses of a job that does not assemble."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from launcher.argv import free_port
from tests.conftest import REPO, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
BIN = os.path.dirname(sys.executable)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(env or {})}, cwd=REPO)


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    return start(sys.executable, "-m", "bigtrain", "launch", *args, env=env)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
    """The recipe and the train losses of a plain `torchrun --nproc_per_node 2 -m bigtrain train` run."""
    tmp = tmp_path_factory.mktemp("launch")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(
        cache_dir, tmp / "runs", train={"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 2},
        eval={"max_samples": 8}))
    result = run_torchrun(2, "train", str(recipe), "run.name=torchrun")
    assert result.returncode == 0, result.stderr
    return recipe, losses(tmp / "runs/torchrun")


def losses(run_dir) -> list[float]:
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    return [r["train/loss"] for r in records]


def test_launch_two_processes_matches_torchrun(baseline):
    recipe, expected = baseline
    result = finish(launch(str(recipe), "run.name=launched", "--nproc-per-node", "2"))
    assert result.returncode == 0, result.stderr
    assert "ddp × 2 on cpu" in result.stderr
    assert losses(recipe.parent / "runs/launched") == pytest.approx(expected, rel=1e-6)


def test_two_node_launches_on_localhost_match_one_node_with_two_processes(baseline):
    recipe, expected = baseline
    common = [str(recipe), "run.name=two-nodes", "--nnodes", "2", "--nproc-per-node", "1",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    nodes = [launch(*common, "--node-rank", str(rank)) for rank in (0, 1)]
    results = [finish(p) for p in nodes]
    for r in results:
        assert r.returncode == 0, r.stderr
    assert "ddp × 2 on cpu" in results[0].stderr
    assert losses(recipe.parent / "runs/two-nodes") == pytest.approx(expected, rel=1e-6)


def test_two_nodes_with_a_node_local_cache_dir_stop_with_one_line_naming_it(tmp_path):
    """data.cache_dir=~/bigtrain-cache where each "node" has a home of its own (as /tmp or a local disk is per
    node): rank 0 prepares into its node's folder, rank 1 finds nothing there; both stop with the same line."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe("~/bigtrain-cache", tmp_path / "runs"))
    port = str(free_port())
    homes = [tmp_path / f"home{rank}" for rank in (0, 1)]
    for home in homes:
        home.mkdir()
    nodes = [launch(str(recipe), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                    "--master-addr", "127.0.0.1", "--master-port", port, env={"HOME": str(homes[rank])})
             for rank in (0, 1)]
    results = [finish(p) for p in nodes]
    expected = ("bigtrain: error: data.cache_dir=~/bigtrain-cache: rank 0 prepared the data there, but ranks 1 "
                f"(on {os.uname().nodename}) do not see it — a folder local to each node? Point data.cache_dir at a "
                f"filesystem every node mounts")
    for r in results:
        assert r.returncode != 0 and expected in r.stderr.splitlines(), r.stderr[-3000:]
    assert list((homes[0] / "bigtrain-cache").glob("*/index.json")) and not (homes[1] / "bigtrain-cache").exists()
    assert not (tmp_path / "runs/tiny/metrics.jsonl").exists()


@pytest.mark.parametrize("nodes", [1, 2])
def test_deepspeed_launcher_runs_two_processes(baseline, nodes, tmp_path):
    """The deepspeed launcher (`--num_gpus N`, no GPU needed: it only sets ranks) passes --local_rank=N first;
    as two nodes it runs without ssh (`--no_ssh --node_rank`), one launch per node, each with a hostfile of its
    own that is gone when the launch ends."""
    recipe, expected = baseline
    temp = tmp_path / "tmp"
    temp.mkdir()
    name = f"deepspeed-launcher-{nodes}"
    topology = ["--nproc-per-node", str(2 // nodes)]
    if nodes > 1:
        topology += ["--nnodes", str(nodes), "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    procs = [launch(str(recipe), f"run.name={name}", *topology, "--launcher", "deepspeed",
                    *(["--node-rank", str(rank)] if nodes > 1 else []), env={"TMPDIR": str(temp)}) for rank in range(nodes)]
    results = [finish(p) for p in procs]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert f"--local_rank={2 // nodes - 1}" in results[-1].stdout + results[-1].stderr  # the launcher's spawn log
    if nodes > 1:  # the runner read node names from our hostfile, and it is gone
        assert "WORLD INFO DICT: {'node-0': [0], 'node-1': [0]}" in results[0].stdout
    assert not list(temp.glob("bigtrain-hostfile-*"))
    assert losses(recipe.parent / f"runs/{name}") == pytest.approx(expected, rel=1e-6)


def test_accelerate_launch_runs_two_processes(baseline):
    """accelerate runs torchrun underneath with --multi_gpu, on CPU too (with --cpu it starts one process)."""
    recipe, expected = baseline
    result = finish(start(f"{BIN}/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "bigtrain", "train", str(recipe), "run.name=accelerate"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp × 2 on cpu" in result.stderr
    assert losses(recipe.parent / "runs/accelerate") == pytest.approx(expected, rel=1e-6)


def test_accelerate_flags_map_onto_the_recipe_or_fail_when_they_contradict_it(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", parallel={"precision": "bf16"}))
    accelerate = [f"{BIN}/accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                  "--dynamo_backend", "no"]
    bad = finish(start(*accelerate, "--mixed_precision", "fp16", "-m", "bigtrain", "train", str(recipe)))
    assert bad.returncode != 0
    assert (f"bigtrain: error: accelerate launch --mixed_precision fp16 contradicts parallel.precision: bf16 in "
            f"{recipe} — drop the flag or set parallel.precision=fp16") in bad.stderr.splitlines()
    assert not (tmp_path / "runs").exists()
    # A recipe that leaves precision to the hardware (auto) takes accelerate's choice.
    open_recipe = write_recipe(tmp_path / "open.yaml", tiny_recipe(cache_dir, tmp_path / "runs",
                                                                   parallel={"precision": "auto"}))
    good = finish(start(*accelerate, "--mixed_precision", "bf16", "-m", "bigtrain", "check", str(open_recipe)))
    assert good.returncode == 0, good.stderr[-3000:]
    lines = good.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("precision "))
    assert lines[at].split()[:2] == ["precision", "bf16:"] and "compute=bfloat16" in lines[at + 1].split()


def test_launcher_processes_with_mismatched_nnodes_fail_fast_with_the_diagnosis_on_every_rank(baseline):
    """Node 0 says --nnodes 2, node 1 says --nnodes 3: torchrun still forms a job of 2 processes; the preflight
    sees the disagreement and every rank exits with the same one-line diagnosis, not a hang."""
    recipe, _ = baseline
    port = str(free_port())
    began = time.monotonic()
    nodes = [launch(str(recipe), "run.name=mismatch", "--nnodes", str(nnodes), "--node-rank", str(rank),
                    "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                    "train.global_batch_size=12")
             for rank, nnodes in ((0, 2), (1, 3))]
    results = [finish(p, timeout=180) for p in nodes]
    assert time.monotonic() - began < 90  # 60 s plus process start-up on a busy machine
    diagnosis = ("rank 1 ({host}, node 1) expects 3 nodes but rank 0 ({host}, node 0) expects 2 nodes — start every "
                 "node with the same --nnodes").format(host=os.uname().nodename)
    for rank, r in enumerate(results):
        assert r.returncode != 0
        assert f"bigtrain: error: preflight on rank {rank} ({os.uname().nodename}): {diagnosis}" in r.stderr.splitlines()
    assert not (recipe.parent / "runs/mismatch/metrics.jsonl").exists()


def test_process_whose_peer_never_starts_exits_after_init_timeout_with_the_diagnosis(baseline):
    """Rank 0 of 2 alone (as under srun when the other node died): init waits parallel.init_timeout_s, not forever."""
    recipe, _ = baseline
    port = str(free_port())
    began = time.monotonic()
    result = finish(start(sys.executable, "-m", "bigtrain", "train", str(recipe), "run.name=alone",
                          "parallel.init_timeout_s=5",
                          env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": port}), timeout=120)
    assert time.monotonic() - began < 60
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"bigtrain: error: rank 0 of 2 on {os.uname().nodename}: the job did not assemble at master 127.0.0.1:{port} "
        f"within parallel.init_timeout_s=5 s")
    # The same under `bigtrain launch`: torchrun's agent gives up after the same timeout.
    began = time.monotonic()
    alone = finish(launch(str(recipe), "run.name=alone", "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "parallel.init_timeout_s=5"),
                   timeout=120)
    assert time.monotonic() - began < 60
    assert alone.returncode != 0 and "1/2 clients joined" in alone.stderr
