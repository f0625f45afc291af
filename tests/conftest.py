"""Shared test fixtures: a session-wide data cache and small recipe writers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


# The test files that take longest (seconds on 2 cores), run first: xdist hands out whole files in collection
# order as workers come free, so a long file collected last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_tasks_mlm_to_classifier.py", "test_deepspeed.py", "test_tasks.py", "test_train.py",
                 "test_slurm.py", "test_fsdp.py", "test_memory_plan.py", "test_distill.py", "test_lora.py",
                 "test_launch.py", "test_ddp.py", "test_lm_eval_adapter.py")


def pytest_configure(config):
    """Under several xdist workers each test's processes get one CPU thread (torch's default is one per core:
    two workers' runs would fight over every core, and a run slowed 3× where its threads contend)."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # the processes tests start inherit it
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session so the tiny corpus is tokenized once."""
    return tmp_path_factory.mktemp("bigtrain-cache")


@pytest.fixture(scope="session")
def ragged_corpus(tmp_path_factory) -> Path:
    """A jsonl of short documents of very uneven length (1 to 12 source lines each), so unpacked
    batches really contain padding."""
    import json
    import random
    import textwrap

    lines = [l for l in Path(textwrap.__file__).read_text().splitlines() if l.strip()]
    rng = random.Random(0)
    docs, i = [], 0
    while i < len(lines):
        n = rng.randint(1, 12)
        docs.append("\n".join(lines[i:i + n]))
        i += n
    path = tmp_path_factory.mktemp("ragged") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def tiny_recipe(cache_dir: Path, run_dir_parent: Path, **sections) -> dict:
    """A debug-size causal-LM recipe on a small slice of python-stdlib (fast on CPU). fp32, so the numbers
    tests compare are the same on every machine (`auto` would pick bf16 on a CPU with native bf16)."""
    recipe = {
        "run": {"name": "tiny", "output_dir": str(run_dir_parent), "seed": 0},
        "model": {"preset": "debug", "max_seq_len": 64},
        "data": {"source": "python-stdlib", "max_documents": 60, "vocab_size": 512, "seq_len": 32,
                 "cache_dir": str(cache_dir), "validation_split": 0.1},
        "train": {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "eval": {"max_samples": 16},
        "logging": {"every": 1, "progress": False, "curves": False},  # drawing costs ~1 s per eval
        "checkpoint": {"every": 0, "keep_last": 0},
        "parallel": {"precision": "fp32"},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, module: str = "bigtrain") -> subprocess.CompletedProcess:
    """Run `python -m bigtrain ARGS` the way a user would; returns the completed process."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def run_torchrun(nproc: int, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m bigtrain ARGS` on CPU (gloo)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "bigtrain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def put_in_hub_cache(hub_cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Place `folder`'s files in a Hugging Face hub cache (HF_HUB_CACHE layout: refs/<revision> → a commit,
    snapshots/<commit>/files), as `hf download` would leave them; returns the snapshot folder."""
    import hashlib
    import shutil

    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


def assert_ema_follows_weights(run_dir: Path, steps: list[int], decay: float, start_step: int) -> None:
    """The EMA weights saved in the run's consecutive checkpoints `steps` (optim.ema_decay) equal the average
    computed here from their model weights: from the first checkpoint's saved EMA on, ema_t = w_t while
    t < start_step, else decay · ema_(t-1) + (1 − decay) · w_t (float64 here, fp32 there)."""
    from bigtrain.checkpoint import open_weights

    def read(step: int, ema: bool) -> dict[str, torch.Tensor]:
        reader = open_weights(run_dir / f"checkpoints/step-{step:07d}", ema=ema)
        return {name: reader.get(name) for name in reader.tensors()}

    expected = {name: t.double() for name, t in read(steps[0], ema=True).items()}
    for step in steps[1:]:
        weights, saved = read(step, ema=False), read(step, ema=True)
        assert saved.keys() == weights.keys() and all(t.dtype == torch.float32 for t in saved.values())
        expected = {name: weights[name].double() if step < start_step else
                    decay * expected[name] + (1 - decay) * weights[name].double() for name in expected}
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor.double(), expected[name], rtol=0, atol=1e-6, msg=f"step {step} {name}")
    # The average lags the weights once it averages (a copy of them would pass the loop above only before start_step).
    assert steps[-1] >= start_step and max((saved[n] - weights[n]).abs().max().item() for n in saved) > 1e-4


def one_process_fsdp_checkpoint(run_dir: Path):
    """(checkpoint folder, engine) of a real one-process fsdp save of the debug preset at step 1 (a DCP folder with
    its manifest); the caller destroys the 1-rank process group it made."""
    from bigtrain.checkpoint import TrainState, save
    from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
    from bigtrain.models import build_model
    from bigtrain.parallel import build_engine, init_distributed
    from bigtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    dist = init_distributed("cpu")
    model = build_model(ModelConfig(preset="debug"), 128, device="meta")
    engine = build_engine(ParallelConfig(strategy="fsdp", precision="fp32"), model,
                          lambda m: build_optimizer(OptimConfig(), m, dist.device), dist)
    folder = save(run_dir, TrainState(step=1), engine, dist, config_yaml="model: {preset: debug}\n", keep_last=0)
    return folder, engine
