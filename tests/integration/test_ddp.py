"""DDP under torchrun (gloo, 2 CPU processes) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bigtrain.checkpoint import list_checkpoints, verify
from tests.conftest import REPO, assert_ema_follows_weights, run_cli, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow


def test_ddp_matches_single_process(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2},
        eval={"max_samples": 15}))  # 15 validation samples: not divisible by 2 ranks
    single = run_cli("train", str(recipe), "run.name=single", "train.micro_batch_size=4")
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun(2, "train", str(recipe), "run.name=ddp")
    assert ddp.returncode == 0, ddp.stderr
    assert "ddp × 2" in ddp.stderr and "accumulation 2" in ddp.stderr

    a, a_eval = read_metrics(tmp_path / "runs/single")
    b, b_eval = read_metrics(tmp_path / "runs/ddp")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5)
        assert rb["train/lr"] == ra["train/lr"]
        assert rb["train/samples_consumed"] == ra["train/samples_consumed"]
    # Eval over an odd-sized validation set gives the single-process metrics (no padded duplicates).
    assert b_eval[-1]["eval/loss"] == pytest.approx(a_eval[-1]["eval/loss"], rel=1e-5)
    wa = torch.load(tmp_path / "runs/single/checkpoints/step-0000006/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "runs/ddp/checkpoints/step-0000006/model.pt", weights_only=True)
    # Adam divides by sqrt(v): for a weight whose gradient is ~0, fp32 reduction-order noise moves it by up to
    # ~lr per step, so absolute agreement is bounded by a small fraction of lr (3e-3) × steps, not by 1e-5.
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4)


def test_ddp_run_resumes_on_one_process(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2}))
    ema = ("optim.ema_decay=0.6", "optim.ema_start_step=2", "checkpoint.every=1")  # every step saved (in the background)
    first = run_torchrun(2, "train", str(recipe), "train.stop_at_step=3", *ema)
    assert first.returncode == 0, first.stderr
    rest = run_cli("train", str(recipe), *ema)
    assert rest.returncode == 0, rest.stderr
    assert "resuming at step 3" in rest.stderr
    folders = list_checkpoints(tmp_path / "runs/tiny")
    assert [p.name for p in folders] == [f"step-{s:07d}" for s in range(1, 7)]
    for folder in folders:
        verify(folder)
    records, _ = read_metrics(tmp_path / "runs/tiny")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["train/samples_consumed"] == 48
    # The EMA of the weights: a copy at step 1, averaged from step 2 on, carried from 2 ranks to 1 at step 3.
    assert_ema_follows_weights(tmp_path / "runs/tiny", list(range(1, 7)), decay=0.6, start_step=2)


def test_bad_recipe_under_torchrun_exits_nonzero_with_the_message(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", train={"global_batch_size": 6}))
    result = run_torchrun(2, "train", str(recipe), "train.micro_batch_size=2")
    assert result.returncode != 0
    assert "train.global_batch_size=6 is not divisible by train.micro_batch_size × data-parallel size = 2 × 2 = 4" in result.stderr


def test_two_process_start_under_slurm_without_prepared_data_says_to_run_prepare(tmp_path):
    """Under Slurm a missing cache means a job that skipped slurm/launch.sh's prepare step: rank 0 does not
    tokenize while the other rank waits; every rank stops with one line, nothing prepared."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "cache", tmp_path / "runs"))
    result = run_torchrun(2, "train", str(recipe), env={"SLURM_JOB_ID": "4242"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bigtrain: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]
    assert errors[0].startswith("bigtrain: error: data: not prepared (") and "this 2-process start would tokenize it " \
        "on rank 0 while the other ranks wait (under Slurm) — run 'bigtrain prepare RECIPE' first" in errors[0]
    assert not list((tmp_path / "cache").glob("*/index.json"))


@pytest.mark.parametrize("task, arch", [("classification", "encoder"), ("sft", "decoder")])
def test_ddp_matches_single_process_with_ragged_task_batches(tmp_path, cache_dir, task, arch):
    """(micro 8 × accum 1) on one process vs 2 ranks × (micro 2 × accum 2): the same logged loss (the
    example-weighted or token-weighted global mean) and the same eval over an odd-sized validation set."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", task={"name": task}, model={"arch": arch, "max_seq_len": 128},
        data={"source": "python-stdlib-docstrings", "max_documents": 300, "validation_split": 0.1, "packing": False,
              "seq_len": 64},
        train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}, eval={"max_samples": 15}))
    single = run_cli("train", str(recipe), "run.name=single", "train.micro_batch_size=8")
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun(2, "train", str(recipe), "run.name=ddp")
    assert ddp.returncode == 0, ddp.stderr
    a, a_eval = read_metrics(tmp_path / "runs/single")
    b, b_eval = read_metrics(tmp_path / "runs/ddp")
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=1e-6)  # same weights, same batch
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5)
    for key in a_eval[-1]:
        assert b_eval[-1][key] == pytest.approx(a_eval[-1][key], rel=1e-5)
    if task == "classification":  # its confusion matrix is summed over ranks: exactly the one process's counts
        reports = [json.loads((tmp_path / f"runs/{name}/eval/step-0000004.json").read_text()) for name in ("single", "ddp")]
        assert reports[1]["confusion_matrix"] == reports[0]["confusion_matrix"]
        assert sum(map(sum, reports[0]["confusion_matrix"])) == 15


def test_mlm_masks_and_losses_match_across_world_sizes(tmp_path, cache_dir):
    """Masks are drawn from (seed, global sample position): 2 ranks see the same masked batches as 1."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", task={"name": "masked_lm"}, model={"arch": "encoder"},
        train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}, eval={"max_samples": 15}))
    single = run_cli("train", str(recipe), "run.name=single", "train.micro_batch_size=8")
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun(2, "train", str(recipe), "run.name=ddp")
    assert ddp.returncode == 0, ddp.stderr
    (a, a_eval), (b, b_eval) = read_metrics(tmp_path / "runs/single"), read_metrics(tmp_path / "runs/ddp")
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=1e-6)
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5)
    assert b_eval[-1]["eval/mlm_accuracy"] == pytest.approx(a_eval[-1]["eval/mlm_accuracy"], rel=1e-9)


def test_ddp_activation_checkpointing_on_two_processes_gives_the_same_gradients(tmp_path, cache_dir):
    """Recomputing activations in backward changes memory, not numbers: same grad norms, losses and weights
    (selective checkpointing here; full is tested under single, fsdp and ZeRO-3)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}))
    for name, ac in (("plain", "none"), ("ac", "selective")):
        result = run_torchrun(2, "train", str(recipe), f"run.name={name}", f"parallel.activation_checkpointing={ac}")
        assert result.returncode == 0, result.stderr
    (plain, _), (ac, _) = read_metrics(tmp_path / "runs/plain"), read_metrics(tmp_path / "runs/ac")
    assert len(plain) == len(ac) == 4
    for a, b in zip(plain, ac):
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-6)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
    wa = torch.load(tmp_path / "runs/plain/checkpoints/step-0000004/model.pt", weights_only=True)
    wb = torch.load(tmp_path / "runs/ac/checkpoints/step-0000004/model.pt", weights_only=True)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-6, msg=key)


def test_rank_zero_work_longer_than_the_collective_timeout_holds_no_collective_open(tmp_path):
    """Data preparation on rank 0 may outlast parallel.collective_timeout_s: the other ranks wait in short
    all-reduces, not in one collective that times out."""
    script = tmp_path / "long_rank0.py"
    script.write_text(textwrap.dedent("""
        import time
        from bigtrain.parallel.dist import on_main
        from bigtrain.parallel import init_distributed, shutdown
        dist = init_distributed("cpu", collective_timeout_s=3)
        result = on_main(dist, lambda: time.sleep(8) or "prepared")
        print(f"rank {dist.rank}: {result}", flush=True)
        shutdown(dist)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(result.stdout.splitlines()) == ["rank 0: prepared", "rank 1: None"]


def test_mixture_order_holds_across_world_sizes_and_resumes_exactly_and_elastically(tmp_path):
    """Two local sources at 0.7 / 0.3 (the BPE trained on the first serves both): the steps a 2-process run
    takes before it stops equal one process's, a one-process resume of it continues the same losses, and a
    one-process run stopped and resumed equals the straight one bit for bit. Each source's tokens are logged.
    Eval (eval.max_samples=16) scores both sources alike, 8 samples each, and logs each one's loss: the same
    under ddp (sums and target counts all-reduced) as in one process."""
    from bigtrain.data.mixture import block_pattern

    lines = [line for line in (REPO / "bigtrain/train/loop.py").read_text().splitlines() if line.strip()]
    prose = [line for line in (REPO / "README.md").read_text().splitlines() if line.strip()]
    for name, text in (("code", lines), ("prose", prose)):
        rows = ["\n".join(text[i:i + 6]) for i in range(0, len(text), 6)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    mix = [{"source": str(tmp_path / "code.jsonl"), "weight": 0.7, "name": "code"},
           {"source": str(tmp_path / "prose.jsonl"), "weight": 0.3, "name": "prose"}]
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tmp_path / "cache", tmp_path / "runs", data={"mixture": mix, "max_documents": None, "seq_len": 32},
        train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}))
    prepared = run_cli("prepare", str(recipe))
    assert prepared.returncode == 0, prepared.stderr
    assert len([line for line in prepared.stdout.splitlines() if line.startswith("prepared ")]) == 2

    def train(name: str, nproc: int = 1, *extra: str):
        result = (run_cli if nproc == 1 else lambda *a: run_torchrun(2, *a))("train", str(recipe), f"run.name={name}", *extra)
        assert result.returncode == 0, result.stderr
        return result

    straight = train("straight")
    assert "data.mixture over the run: code " in straight.stderr
    train("resumed", 1, "train.stop_at_step=2")
    train("resumed")
    train("elastic", 2, "train.stop_at_step=2")
    assert "resuming at step 2" in train("elastic").stderr
    runs = {name: read_metrics(tmp_path / "runs" / name)[0] for name in ("straight", "resumed", "elastic")}
    assert [r["train/loss"] for r in runs["resumed"]] == [r["train/loss"] for r in runs["straight"]]  # bit for bit
    assert [r["train/loss"] for r in runs["elastic"]] == pytest.approx([r["train/loss"] for r in runs["straight"]],
                                                                       rel=1e-5)
    evals = {name: {r["step"]: r for r in read_metrics(tmp_path / "runs" / name)[1]} for name in ("resumed", "elastic")}
    one, two = evals["resumed"][2], evals["elastic"][2]  # step 2: one process; two processes (ddp)
    assert two.keys() == one.keys() == {"step", "eval/loss", "eval/ppl", "eval/loss/code", "eval/loss/prose"}
    assert {k: two[k] for k in one} == pytest.approx(one, rel=1e-5)
    # 8 packed samples of each source, 32 targets each: the overall loss is the two sources' mean
    assert one["eval/loss"] == pytest.approx((one["eval/loss/code"] + one["eval/loss/prose"]) / 2, rel=1e-9)
    assert one["eval/loss/code"] != one["eval/loss/prose"]
    sources, _, _ = block_pattern([0.7, 0.3])
    code = int((sources[:32] == 0).sum())  # of the 4 × 8 samples read
    assert {k: v for k, v in runs["straight"][-1].items() if k.startswith("data/")} == {
        "data/tokens/code": code * 32, "data/tokens/prose": (32 - code) * 32}
