"""DeepSpeed ZeRO 1/2/3 under torchrun (gloo, 2 CPU processes, DeepSpeed's CPU accelerator) against one process.

Every test here starts real processes. DeepSpeed compiles its shm-comm op (and cpu_adam for the offload
test) on first use; tests/integration/conftest.py keeps TORCH_EXTENSIONS_DIR in a cache that .ci/run reuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bigtrain.core.filehash import file_entry
from tests.conftest import REPO, assert_ema_follows_weights, run_cli, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

STEPS = 4
TRAIN = {"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2}
EVAL = {"max_samples": 8}
MLM = {"task": {"name": "masked_lm"}, "model": {"arch": "encoder"}}


def recipe_for(tmp_path, cache_dir, name="r", **sections):
    return write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(cache_dir, tmp_path / "runs",
                                                               **{"train": TRAIN, "eval": EVAL, **sections}))


def deepspeed_args(stage: int, *extra: str) -> list[str]:
    return ["parallel.strategy=deepspeed", f"parallel.zero_stage={stage}", *extra]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(run_dir, step=STEPS) -> dict[str, torch.Tensor]:
    """The model weights of a run's checkpoint, whatever strategy wrote it (the reader export and init_from use)."""
    from bigtrain.checkpoint import open_weights
    from bigtrain.parallel import iter_weights

    return dict(iter_weights(open_weights(run_dir / "checkpoints" / f"step-{step:07d}")))


def assert_same_run(run_dir, reference_dir, rel: float, steps=range(1, STEPS + 1)):
    """Same logged losses, LRs and sample counts at `steps`, and the same final weights."""
    got = {r["step"]: r for r in read_metrics(run_dir)[0]}
    want = {r["step"]: r for r in read_metrics(reference_dir)[0]}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in steps:
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], rel=rel), f"step {step}"
        assert got[step]["train/lr"] == want[step]["train/lr"]
        assert got[step]["train/samples_consumed"] == want[step]["train/samples_consumed"]
    a, b = final_weights(run_dir), final_weights(reference_dir)
    assert sorted(a) == sorted(b)  # the bare model's state_dict keys, tied weights included
    # Adam divides by sqrt(v): reduction-order noise moves near-zero-gradient weights by up to ~lr per step.
    tol = 1e-4 if rel <= 1e-5 else 3e-2
    for key in b:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=tol, atol=tol, msg=key)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, cache_dir):
    """One-process (strategy single) reference runs: causal and MLM in fp32, causal in bf16."""
    tmp = tmp_path_factory.mktemp("single")
    runs = {}
    for key, precision, sections in (("causal", "fp32", {}), ("mlm", "fp32", MLM), ("causal", "bf16", {})):
        recipe = recipe_for(tmp, cache_dir, f"{key}-{precision}", **sections)
        ok(run_cli("train", str(recipe), f"run.name={key}-{precision}", "train.micro_batch_size=4",
                   f"parallel.precision={precision}"))
        runs[key, precision] = (recipe, tmp / "runs" / f"{key}-{precision}")
    return runs


@pytest.mark.parametrize("stage, task, precision", [
    (1, "causal", "fp32"), (2, "causal", "fp32"), (3, "causal", "fp32"),
    (1, "mlm", "fp32"), (2, "mlm", "fp32"), (3, "mlm", "fp32"),
    (2, "causal", "bf16"),
])
def test_deepspeed_zero_on_two_processes_matches_single_process(tmp_path, single_runs, stage, task, precision):
    recipe, reference = single_runs[task, precision]
    result = ok(run_torchrun(2, "train", str(recipe), "run.name=ds", f"run.output_dir={tmp_path}",
                             f"parallel.precision={precision}", *deepspeed_args(stage)))
    assert "deepspeed × 2" in result.stderr and "accumulation 2" in result.stderr
    run_dir = tmp_path / "ds"
    assert json.loads((run_dir / f"checkpoints/step-{STEPS:07d}/trainer.json").read_text())["format"] == "deepspeed"
    assert_same_run(run_dir, reference, rel=1e-5 if precision == "fp32" else 2e-2)
    # The precision table printed and recorded is DeepSpeed's (bf16: bf16 parameters, fp32 master weights).
    table = json.loads((run_dir / "precision.json").read_text())
    assert table["param"] == {"fp32": "float32", "bf16": "bfloat16"}[precision] and table["master_weights"] == "float32"
    assert_deepspeed_tools_read(run_dir / f"checkpoints/step-{STEPS:07d}")
    # Each rank's optimizer-state file (fp32 master weights beside the moments) has a "weights" part: init_from's check.
    files = json.loads((run_dir / f"checkpoints/step-{STEPS:07d}/manifest.json").read_text())["files"]
    with_parts = sorted(name for name, entry in files.items() if "weights" in entry.get("parts", {}))
    assert len(with_parts) == 2 and all(name.endswith("_optim_states.pt") for name in with_parts)


def assert_deepspeed_tools_read(folder):
    """DeepSpeed's own converter reads a bigtrain checkpoint as its docs show, without a tag (the `latest` file,
    which the manifest covers, names it): the very tensors bigtrain's reader gives."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bigtrain import checkpoint

    assert (folder / "latest").read_text() == "deepspeed" and "latest" in checkpoint.verify(folder)["files"]
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    ours = final_weights(folder.parent.parent, step=int(folder.name.split("-")[1]))
    assert sorted(theirs) == sorted(ours)
    assert max((theirs[k].float() - ours[k].float()).abs().max().item() for k in ours) == 0.0


def test_zero3_activation_checkpointing_on_two_processes_gives_the_same_gradients(tmp_path, cache_dir):
    """Full and selective checkpointing (ZeRO-3 fetches the partitioned weights again for the recomputation): the
    same losses, gradient norms and weights as without. Selective keeps each matmul's output, which ZeRO-3's own
    linear adds the bias to in place (the recomputation then added it twice: equal at step 1, while the biases are
    zero, wrong from step 2), so a selective run uses torch's linear, and is compared with a run without
    checkpointing on torch's linear too (their bias gradients are summed in another order: the key bias's, zero
    but for rounding, then differ, and AdamW turns that noise into updates of lr's size). No parameter is kept
    gathered for being small (persistence threshold 0; this model's are all under the default's 1e5 elements). At
    this size ZeRO-3 still keeps them gathered between passes; with a larger model it gathers a block again for
    the recomputation, which stopped selective checkpointing's (deepspeed.py): tests/integration/test_memory_plan.py
    trains a 27M-parameter model under ZeRO-3 with selective checkpointing."""
    recipe = recipe_for(tmp_path, cache_dir)
    configs = {}
    for name, extra in (("partitioned", {}), ("torch-linear", {"memory_efficient_linear": False})):
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0, **extra}}))
    runs = {"none": ("none", "partitioned"), "full": ("full", "partitioned"),
            "none-torch-linear": ("none", "torch-linear"), "selective": ("selective", "partitioned")}
    for name, (checkpointing, config) in runs.items():
        ok(run_torchrun(2, "train", str(recipe), f"run.name={name}", f"parallel.activation_checkpointing={checkpointing}",
                        *deepspeed_args(3), f"parallel.deepspeed_config={configs[config]}"))
    for reference, name in (("none", "full"), ("none-torch-linear", "selective")):
        plain, _ = read_metrics(tmp_path / "runs" / reference)
        ac, _ = read_metrics(tmp_path / "runs" / name)
        for a, b in zip(plain, ac, strict=True):
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-6)
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
        a, b = final_weights(tmp_path / "runs" / reference), final_weights(tmp_path / "runs" / name)
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_deepspeed_run_resumes_on_another_number_of_processes(tmp_path, single_runs, stage, first, then):
    """Saved on `first` ranks, resumed on `then` (DeepSpeed's universal checkpoint): the same next losses and final
    weights as an uninterrupted run; no universal copy is left, nor one an earlier start left. The EMA of the
    weights (ZeRO-3: each rank's partitions, in a file per rank) carries over too, and equals the average computed
    from every step's checkpoint; eval scores it (eval.use_ema) and the final weights are still the reference's: the
    EMA is swapped out again exactly. At the last step ZeRO-3's eval of the EMA equals ZeRO-2's (its small
    parameters, kept gathered, are swapped too)."""
    recipe, reference = single_runs["causal", "fp32"]

    def launch(nproc, *args):
        return ok(run_torchrun(nproc, *args) if nproc > 1 else run_cli(*args))

    args = ["train", str(recipe), "run.name=elastic", f"run.output_dir={tmp_path}", *deepspeed_args(stage),
            "optim.ema_decay=0.6", "optim.ema_start_step=1", "checkpoint.every=1", "eval.use_ema=true"]
    launch(first, *args, "train.stop_at_step=2")
    run_dir = tmp_path / "elastic"
    leftover = run_dir / "checkpoints/.universal-step-0000002-crashed"  # a start killed while converting left it
    (leftover / "deepspeed").mkdir(parents=True)
    rest = launch(then, *args)
    assert "resuming at step 2" in rest.stderr
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the converted copy and the leftover removed
    assert_same_run(run_dir, reference, rel=1e-5)
    files = len(list((run_dir / "checkpoints/step-0000002").glob("ema-rank-*.pt")))
    assert files == (first if stage == 3 else 1)
    assert_ema_follows_weights(run_dir, [1, 2, 3, 4], decay=0.6, start_step=1)
    last_eval = read_metrics(run_dir)[1][-1]
    assert last_eval["step"] == 4
    EMA_EVAL_LOSS.setdefault((first, then), {})[stage] = last_eval["eval/loss"]
    if len(EMA_EVAL_LOSS[first, then]) == 2:  # both stages ran (stage 3 after 2: parametrize order)
        assert EMA_EVAL_LOSS[first, then][3] == pytest.approx(EMA_EVAL_LOSS[first, then][2], rel=1e-5)


EMA_EVAL_LOSS: dict = {}  # (first, then) -> {stage: eval/loss of the EMA at the last step}


def test_deepspeed_zero2_checkpoint_resumes_as_zero1_and_zero3_refuses_it(tmp_path, single_runs):
    """ZeRO 1 ↔ 2 goes through the universal checkpoint; ZeRO-3's layout is a one-line error, exit 2."""
    recipe, reference = single_runs["causal", "fp32"]
    args = ["train", str(recipe), "run.name=stages", f"run.output_dir={tmp_path}", "parallel.strategy=deepspeed"]
    ok(run_cli(*args, "parallel.zero_stage=2", "train.stop_at_step=2"))
    refused = run_cli(*args, "parallel.zero_stage=3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "was written with parallel.zero_stage=2, which does not resume under parallel.zero_stage=3 — resume with "
        "zero_stage=2 (on any number of processes), or start from its weights with model.init_from")
    crafted = tmp_path / "crafted"
    shutil.copytree(tmp_path / "stages", crafted)  # before the resume below adds steps 3-4
    assert "resuming at step 2" in ok(run_cli(*args, "parallel.zero_stage=1")).stderr
    assert_same_run(tmp_path / "stages", reference, rel=1e-5)

    # A crafted checkpoint (consistent manifest) whose optimizer file runs code when DeepSpeed unpickles it
    # with weights_only=False: refused before DeepSpeed reads it, by export and by resume.
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = crafted / "checkpoints/step-0000002"
    target = sorted((folder / "deepspeed").glob("*optim_states.pt"))[0]
    torch.save({"optimizer_state_dict": RunsCode()}, target)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][str(target.relative_to(folder))] = file_entry(target)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for result in (run_cli("export", str(crafted), str(tmp_path / "out")),
                   run_cli("train", str(recipe), "run.name=crafted", f"run.output_dir={tmp_path}",
                           *deepspeed_args(2))):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].endswith(
            f"refusing DeepSpeed checkpoint file {target}: it would run 'posix.system', which is not a tensor or "
            f"plain data")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_init_from_loads_full_weights_into_zero3_on_two_processes(tmp_path, single_runs):
    """model.init_from under ZeRO-3: partitioned parameters and DeepSpeed's fp32 master copies both take the
    checkpoint's weights, so the first steps equal a one-process init_from run's."""
    recipe, reference = single_runs["causal", "fp32"]
    args = ["train", str(recipe), f"model.init_from={reference}", "train.max_steps=2", f"run.output_dir={tmp_path}"]
    ok(run_cli(*args, "run.name=init-single", "train.micro_batch_size=4"))
    ok(run_torchrun(2, *args, "run.name=init-zero3", *deepspeed_args(3)))
    a, _ = read_metrics(tmp_path / "init-single")
    b, _ = read_metrics(tmp_path / "init-zero3")
    fresh, _ = read_metrics(reference)
    assert a[0]["train/loss"] < fresh[0]["train/loss"] - 0.05  # trained weights really were loaded
    for ra, rb in zip(a, b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5)


def test_zero3_init_from_verifies_only_the_fp32_weights_in_its_optimizer_files(tmp_path, cache_dir, capsys):
    """ZeRO-3 keeps the fp32 master weights in each rank's optimizer-state file, beside the Adam moments. init_from
    checks just those weights (memory-mapped) against the manifest's "weights" part: a damaged moment does not stop it
    (a resume still refuses the checkpoint), a damaged weight is the one-line exit 2 naming the file. (One process
    saves; the starts are in-process single runs, which read a ZeRO checkpoint the same way.)"""
    from bigtrain import checkpoint
    from bigtrain.core import safe_load
    from bigtrain.cli import main

    ok(run_cli("train", str(recipe_for(tmp_path, cache_dir, "zero3", checkpoint={"every": 1, "keep_last": 0})),
               "run.name=zero3", "train.max_steps=1", *deepspeed_args(3)))
    run_dir = tmp_path / "runs/zero3"
    folder = run_dir / "checkpoints/step-0000001"
    name = "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert [n for n, entry in files.items() if "parts" in entry] == [name]
    path = folder / name
    zero = safe_load.torch_file(path, allowed=safe_load.deepspeed_classes())["optimizer_state_dict"]
    raw = path.read_bytes()

    @contextlib.contextmanager
    def damaged(inside: torch.Tensor):
        """The file with a byte in the middle of tensor `inside` flipped, put back after."""
        found = raw.find(inside.detach().numpy().tobytes())
        assert found >= 0
        at = found + inside.numel() * inside.element_size() // 2
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
        try:
            yield
        finally:
            path.write_bytes(raw)

    def start(tag: str) -> int:
        """A 1-step single run from the checkpoint's run dir."""
        recipe = recipe_for(tmp_path, cache_dir, tag)
        return main(["train", str(recipe), f"run.name={tag}", f"model.init_from={run_dir}", "train.max_steps=1"])

    with damaged(zero["optimizer_state_dict"]["state"][0]["exp_avg"]):
        assert start("from-damaged-moment") == 0
        with pytest.raises(checkpoint.CheckpointError, match=f"corrupted checkpoint file {path}: sha256 does not"):
            checkpoint.verify(folder)
    capsys.readouterr()
    with damaged(zero["fp32_flat_groups"][0]):
        assert start("from-damaged-weight") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == (
        f"bigtrain: error: model.init_from: corrupted checkpoint file {path}: sha256 of its weights does not match "
        f"the manifest — point model.init_from at an intact checkpoint")


def test_export_of_ddp_fsdp_and_zero3_checkpoints_gives_identical_tensors(tmp_path, cache_dir):
    """`bigtrain export` of the three checkpoint formats (torch.save, DCP shards, ZeRO-3 partitions). With lr=0
    every strategy saves the seeded initial weights, so the exports must be bit-identical; each also equals
    its own checkpoint's tensors exactly. (After real steps they agree to reduction-order noise: the parity
    tests here and test_fsdp's export test.)"""
    from safetensors.torch import load_file

    recipe = recipe_for(tmp_path, cache_dir, train={**TRAIN, "max_steps": 2}, optim={"lr": 0.0, "warmup_steps": 0})
    exports = {}
    for name, args in (("ddp", ["parallel.strategy=ddp"]), ("fsdp", ["parallel.strategy=fsdp"]),
                       ("zero3", deepspeed_args(3))):
        ok(run_torchrun(2, "train", str(recipe), f"run.name={name}", *args))
        ok(run_cli("export", str(tmp_path / "runs" / name), str(tmp_path / f"export-{name}")))
        exports[name] = load_file(tmp_path / f"export-{name}/model.safetensors")
        own = final_weights(tmp_path / "runs" / name, step=2)
        assert exports[name].keys() == own.keys()
        assert all(torch.equal(exports[name][k], own[k]) for k in own), name
    ddp = exports["ddp"]
    assert "lm_head.weight" in ddp and all(t.dtype == torch.float32 for t in ddp.values())
    for name in ("fsdp", "zero3"):
        assert exports[name].keys() == ddp.keys()
        for key in ddp:
            assert torch.equal(exports[name][key], ddp[key]), f"{name} {key}"


@pytest.fixture(scope="module")
def uneven_eval(tmp_path_factory, cache_dir):
    """A recipe whose eval splits unevenly over 2 ranks, and its one-process eval records."""
    tmp = tmp_path_factory.mktemp("uneven")
    recipe = recipe_for(tmp, cache_dir, train={**TRAIN, "max_steps": 2},
                        eval={"max_samples": 17, "micro_batch_size": 4, "every": 2})
    ok(run_cli("train", str(recipe), "run.name=single", "train.micro_batch_size=4"))
    return recipe, read_metrics(tmp / "runs/single")[1]


@pytest.mark.parametrize("strategy", [["parallel.strategy=fsdp"], deepspeed_args(3)], ids=["fsdp", "zero3"])
def test_sharded_eval_with_uneven_batch_counts_gives_the_single_process_metrics(tmp_path, uneven_eval, strategy):
    """17 validation samples, eval micro-batch 4, 2 ranks: 3 batches on rank 0, 2 on rank 1. A sharded forward
    all-gathers parameters, so every rank must run as many forwards as the busiest one (the spare one
    discarded), or the ranks' collectives no longer match."""
    recipe, a = uneven_eval
    ok(run_torchrun(2, "train", str(recipe), "run.name=sharded", f"run.output_dir={tmp_path}", *strategy, timeout=300))
    _, b = read_metrics(tmp_path / "sharded")
    assert [e["step"] for e in a] == [e["step"] for e in b] == [2]
    assert b[0]["eval/loss"] == pytest.approx(a[0]["eval/loss"], rel=1e-5)


def probe_precision(recipe: str, out: str) -> None:
    """(Run in a subprocess.) For each ZeRO stage and precision, one training step of two micro-batches through
    the Engine API, recording the real dtypes DeepSpeed keeps, against precision_table(name, 'deepspeed')."""
    from bigtrain.config import load_config
    from bigtrain.core.errors import UserError
    from bigtrain.train.build import build
    from bigtrain.parallel import init_distributed, precision_table

    dist = init_distributed("cpu")
    report = []
    for stage in (1, 2, 3):
        for precision in ("fp32", "bf16"):
            cfg = load_config(recipe, [f"run.name=probe-{stage}-{precision}", f"parallel.precision={precision}",
                                       *deepspeed_args(stage)])
            try:
                b = build(cfg, dist)
            except UserError as e:
                report.append({"stage": stage, "precision": precision, "refused": str(e)})
                continue
            engine, ds = b.engine, b.engine.ds
            params = list(engine.module.parameters())
            for i, sync in enumerate((False, True)):  # two micro-batches: gradients accumulate until the step
                batch = b.task.collate([b.data.train[j] for j in (2 * i, 2 * i + 1)], range(2), dist.device)
                engine.no_sync(sync=sync)
                logits = engine.model(batch["input_ids"])
                engine.backward(b.task.loss_sum(engine.model, batch) / max(int(batch["num_targets"]), 1))
            opt = ds.optimizer
            masters = opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups
            # The reduced, accumulated gradients as DeepSpeed keeps them until the step (this rank's partition).
            if stage == 3:
                grads = [opt.grad_partitions_flat_buffer]
            else:
                grads = [g for v in opt.averaged_gradients.values() for g in (v if isinstance(v, list) else [v])]
            engine.clip_grad_norm(1.0)
            engine.step(True)
            report.append({
                "stage": stage, "precision": precision,
                "table": precision_table(precision, "deepspeed").as_strings(),
                "param": sorted({str(getattr(p, "ds_tensor", p).dtype) for p in params}),
                "compute": [str(logits.dtype)],
                "grad_reduce": [str(opt.communication_data_type)],
                "grad_accum": sorted({str(g.dtype) for g in grads}),
                "master_weights": sorted({str(m.dtype) for m in masters}),
                "optimizer_state": sorted({str(v.dtype) for s in engine.optimizer.state.values()
                                           for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}),
            })
            engine.close()
    with open(out, "w") as f:
        json.dump(report, f)


def test_deepspeed_tensor_dtypes_match_the_precision_table_for_every_zero_stage(tmp_path, cache_dir):
    """bf16 accumulates micro-batch gradients in fp32 (data_types.grad_accum_dtype); at ZeRO-1, where DeepSpeed
    would honour that only by swapping in an optimizer whose checkpoints cannot be exported, bf16 is refused."""
    recipe = recipe_for(tmp_path, cache_dir)
    out = tmp_path / "dtypes.json"
    code = f"from tests.integration.test_deepspeed import probe_precision; probe_precision({str(recipe)!r}, {str(out)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [(r["stage"], r["precision"]) for r in report] == [(s, p) for s in (1, 2, 3) for p in ("fp32", "bf16")]
    assert [r["stage"] for r in report if "refused" in r] == [1]
    assert report[1]["refused"].startswith("parallel.precision=bf16 with parallel.zero_stage=1 is not available")
    for r in report:
        if "refused" in r:
            continue
        want = {k: "torch." + v for k, v in r["table"].items() if k not in ("name", "loss_scaling")}
        where = f"zero{r['stage']} {r['precision']}"
        for key in ("param", "compute", "grad_reduce", "grad_accum", "master_weights", "optimizer_state"):
            assert r[key] == [want[key]], f"{where}: {key} {r[key]} != table {want[key]}"
    assert {r["grad_accum"][0] for r in report if r["precision"] == "bf16" and "refused" not in r} == {"torch.float32"}


def test_zero2_with_the_optimizer_offloaded_to_cpu_trains_on_two_processes(tmp_path, single_runs):
    """DeepSpeedCPUAdam (built with gcc here) does the AdamW update on the CPU: the same run as torch AdamW."""
    recipe, reference = single_runs["causal", "fp32"]
    ok(run_torchrun(2, "train", str(recipe), "run.name=offload", f"run.output_dir={tmp_path}",
                    *deepspeed_args(2, "parallel.offload_optimizer=cpu")))
    assert_same_run(tmp_path / "offload", reference, rel=1e-5)


def test_deepspeed_config_that_contradicts_the_recipe_exits_2_naming_both_values(tmp_path, cache_dir):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"reduce_bucket_size": 1000000}}))
    recipe = recipe_for(tmp_path, cache_dir)
    result = run_cli("train", str(recipe), *deepspeed_args(2, f"parallel.deepspeed_config={extra}"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].endswith(f"error: parallel.deepspeed_config: 'train_batch_size' is 16 in {extra} but the recipe gives "
                         f"8 (train.global_batch_size) — remove the key from {extra} or change the recipe")
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator has no fp16: one line, not its traceback
        result = run_cli("train", str(recipe), "parallel.precision=fp16", *deepspeed_args(2))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(
            "parallel.precision=fp16 is not available with parallel.strategy=deepspeed on the CPU (DeepSpeed's CPU "
            "accelerator has no fp16) — use parallel.precision=bf16 or fp32")


@pytest.mark.gpu
def test_deepspeed_fp16_keeps_fp16_params_and_scales_the_loss_on_gpu(tmp_path, cache_dir):
    """DeepSpeed refuses fp16 on its CPU accelerator ("Type fp16 is not supported on your device")."""
    recipe = recipe_for(tmp_path, cache_dir)
    ok(run_cli("train", str(recipe), "run.name=fp16", "parallel.precision=fp16", *deepspeed_args(2)))
    records, _ = read_metrics(tmp_path / "runs/fp16")
    assert all(r["train/loss_scale"] > 0 for r in records)
    table = json.loads((tmp_path / "runs/fp16/precision.json").read_text())
    assert (table["param"], table["master_weights"], table["loss_scaling"]) == ("float16", "float32", "True")


def test_lora_under_zero3_trains_as_one_process_and_checkpoints_only_the_adapters(tmp_path, cache_dir):
    """model.lora from a base checkpoint under ZeRO-3: the frozen base partitioned, only the adapters in DeepSpeed's
    optimizer. 2 processes stopped at step 2, then resumed on 1 (universal checkpoint), log the losses and end
    with the weights of a one-process run; the checkpoints hold the adapters (exclude_frozen_parameters) and
    base.json, the base's tensors read back from the base."""
    ok(run_cli("train", str(recipe_for(tmp_path, cache_dir, "base", train={**TRAIN, "max_steps": 2})), "run.name=base"))
    recipe = recipe_for(tmp_path, cache_dir, "lora", model={"lora": {"rank": 4, "alpha": 8.0},
                                                            "init_from": str(tmp_path / "runs/base")},
                        optim={"lr": 1e-2}, checkpoint={"every": 2, "keep_last": 0})
    ok(run_cli("train", str(recipe), "run.name=single"))
    ok(run_torchrun(2, "train", str(recipe), "run.name=zero3", *deepspeed_args(3), "train.stop_at_step=2"))
    resumed = ok(run_cli("train", str(recipe), "run.name=zero3", *deepspeed_args(3)))
    assert "resuming at step 2" in resumed.stderr and "deepspeed × 1" in resumed.stderr
    assert_same_run(tmp_path / "runs/zero3", tmp_path / "runs/single", rel=1e-5)
    folder = tmp_path / "runs/zero3/checkpoints/step-0000002"
    assert json.loads((folder / "base.json").read_text())["init_from"].endswith("step-0000002")
    states = sorted((folder / "deepspeed").glob("*model_states.pt"))
    base_size = (tmp_path / "runs/base/checkpoints/step-0000002/model.pt").stat().st_size
    assert len(states) == 2 and all(p.stat().st_size < base_size / 10 for p in states)
