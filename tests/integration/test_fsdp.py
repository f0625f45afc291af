"""FSDP2 under torchrun (gloo, 2 CPU processes) against one process with the same global batch; elastic
resume across world sizes; DCP checkpoints read back by `open_weights`, `model.init_from` and `bigtrain export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (assert_ema_follows_weights, one_process_fsdp_checkpoint, run_cli, run_torchrun, tiny_recipe,
                            write_recipe)
from tests.integration.test_train import read_metrics

FSDP = "parallel.strategy=fsdp"
STEPS = 4
FINAL = f"checkpoints/step-{STEPS:07d}"

# name -> (processes, overrides). Every run: 4 steps of 8 sequences; one process takes micro-batches of 4
# (accumulation 2), two take 2 each (accumulation 2): the same global batches.
RUNS = {
    "single": (1, ["train.micro_batch_size=4"]),
    # Both save every step, "fsdp" in the background (async_save, the default), "fsdp-ac" synchronously.
    "fsdp": (2, [FSDP, "checkpoint.every=1"]),
    "fsdp-ac": (2, [FSDP, "parallel.activation_checkpointing=true", "checkpoint.every=1", "checkpoint.async_save=false"]),
    "fsdp-sac": (2, [FSDP, "parallel.activation_checkpointing=selective"]),
    # HSDP is where reduce-scattering only at the last micro-batch pays: the opt-in is tested here.
    "hsdp-offload": (2, [FSDP, "parallel.shard_group_size=1", "parallel.offload_params=cpu", "parallel.fsdp_no_sync=true"]),
    # The LM loss 8 positions at a time (the head's sharded weight used inside the root's forward): as "fsdp".
    "fsdp-chunked-loss": (2, [FSDP, "checkpoint.every=1", "task.loss_chunk_tokens=8"]),
    "ddp": (2, ["parallel.strategy=ddp"]),
    "single-bf16": (1, ["train.micro_batch_size=4", "parallel.precision=bf16"]),
    "fsdp-bf16": (2, [FSDP, "parallel.precision=bf16"]),
    "mlm-single": (1, ["train.micro_batch_size=4", "task.name=masked_lm", "model.arch=encoder"]),
    "mlm-fsdp": (2, [FSDP, "task.name=masked_lm", "model.arch=encoder"]),
}


def start(nproc: int, *args: str):
    """`bigtrain ARGS` on one plain process, or under torchrun with nproc processes."""
    return run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args)


class Runs:
    """Trains each named run of RUNS once per module, on first use (tests share them)."""

    def __init__(self, root: Path, cache_dir: Path):
        self.root = root
        self.recipe = write_recipe(root / "r.yaml", tiny_recipe(
            cache_dir, root / "runs", train={"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2},
            eval={"max_samples": 15}))
        self.stderr: dict[str, str] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.stderr:
            nproc, overrides = RUNS[name]
            result = start(nproc, "train", str(self.recipe), f"run.name={name}", *overrides)
            assert result.returncode == 0, result.stderr
            self.stderr[name] = result.stderr
        return self.root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp"), cache_dir)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's full model tensors, whatever strategy wrote it (DCP: one tensor at a time)."""
    from bigtrain.checkpoint import open_weights

    reader = open_weights(run_dir / FINAL)
    return {name: reader.get(name) for name in reader.tensors()}


def assert_same_losses(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=rel), rb["step"]
        assert rb["train/grad_norm"] == pytest.approx(ra["train/grad_norm"], rel=max(rel, 1e-4)), rb["step"]


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    # As in test_ddp: Adam moves a ~0-gradient weight by up to ~lr per step on fp32 reduction-order noise.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- parity with one process


@pytest.mark.slow
@pytest.mark.parametrize("single, sharded", [("single", "fsdp"), ("mlm-single", "mlm-fsdp")])
def test_fsdp_on_two_processes_matches_single_process(runs, single, sharded):
    a_dir, b_dir = runs(single), runs(sharded)
    assert "fsdp × 2" in runs.stderr[sharded]
    (a, a_eval), (b, b_eval) = read_metrics(a_dir), read_metrics(b_dir)
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=1e-6)  # the same init, sharded
    assert_same_losses(a, b, rel=1e-5)
    for key in a_eval[-1]:
        if key != "step":
            assert b_eval[-1][key] == pytest.approx(a_eval[-1][key], rel=1e-5), key
    assert json.loads((b_dir / FINAL / "trainer.json").read_text())["format"] == "dcp"
    assert sorted(p.name for p in (b_dir / FINAL).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert_close_weights(final_weights(a_dir), final_weights(b_dir))


@pytest.mark.slow
def test_fsdp_bf16_on_two_processes_matches_single_process_bf16(runs):
    (a, _), (b, _) = read_metrics(runs("single-bf16")), read_metrics(runs("fsdp-bf16"))
    assert "compute=bfloat16" in runs.stderr["fsdp-bf16"]
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=2e-2)
    assert len(b) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp-ac", "fsdp-sac"])
def test_fsdp_activation_checkpointing_on_two_processes_gives_the_same_gradients(runs, name):
    """Recomputation, full or selective, changes memory, not math: the same losses, gradient norms and weights,
    to the bit."""
    (a, _), (b, _) = read_metrics(runs("fsdp")), read_metrics(runs(name))
    assert [(r["train/loss"], r["train/grad_norm"]) for r in b] == [(r["train/loss"], r["train/grad_norm"]) for r in a]
    wa, wb = final_weights(runs("fsdp")), final_weights(runs(name))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_fsdp_chunked_loss_trains_as_the_whole_logits_loss(runs):
    (a, _), (b, _) = read_metrics(runs("fsdp")), read_metrics(runs("fsdp-chunked-loss"))
    assert_same_losses(a, b, rel=1e-6)
    assert_close_weights(final_weights(runs("fsdp")), final_weights(runs("fsdp-chunked-loss")))


@pytest.mark.slow
def test_fsdp_async_saves_write_the_shards_a_synchronous_save_writes(runs):
    """Every step checkpointed by DCP's async_save ("fsdp") and by a synchronous save ("fsdp-ac", whose arithmetic
    is the same to the bit): the same complete checkpoints, each rank's shard file byte for byte."""
    from bigtrain.checkpoint import list_checkpoints, verify

    sync_dir, async_dir = runs("fsdp-ac"), runs("fsdp")
    steps = [f"step-{step:07d}" for step in range(1, STEPS + 1)]
    for run_dir in (sync_dir, async_dir):
        assert [p.name for p in list_checkpoints(run_dir)] == steps
        assert not list((run_dir / "checkpoints").glob(".*"))  # no temp folder left behind
    for step in steps:
        verify(async_dir / "checkpoints" / step)
        for shard in ("__0_0.distcp", "__1_0.distcp"):
            assert (async_dir / "checkpoints" / step / shard).read_bytes() == \
                (sync_dir / "checkpoints" / step / shard).read_bytes(), (step, shard)


@pytest.mark.slow
def test_hsdp_with_cpu_offload_on_two_processes_matches_single_process(runs):
    """shard_group_size=1 on 2 ranks: a (replicate 2, shard 1) mesh; offload_params=cpu keeps shards on the CPU;
    fsdp_no_sync reduces gradients only at each step's last micro-batch (plain fsdp: at every one)."""
    (a, _), (b, _) = read_metrics(runs("single")), read_metrics(runs("hsdp-offload"))
    assert_same_losses(a, b, rel=1e-5)
    assert_close_weights(final_weights(runs("single")), final_weights(runs("hsdp-offload")))


# --------------------------------------------------------------------------- elastic resume


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_fsdp_run_resumes_on_another_number_of_processes(runs, first, then):
    """Stop at step 2 on `first` processes, resume on `then`: DCP reshards model and optimizer state, and
    steps 3-4 log the losses of an uninterrupted run."""
    name = f"elastic-{first}to{then}"
    ema = ("optim.ema_decay=0.6", "optim.ema_start_step=1", "checkpoint.every=1")  # DCP reshards the EMA's shards too
    micro = ["train.micro_batch_size=4"] if first == 1 else []
    stopped = start(first, "train", str(runs.recipe), f"run.name={name}", FSDP, "train.stop_at_step=2", *micro, *ema)
    assert stopped.returncode == 0, stopped.stderr
    micro = ["train.micro_batch_size=4"] if then == 1 else []
    resumed = start(then, "train", str(runs.recipe), f"run.name={name}", FSDP, *micro, *ema)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2" in resumed.stderr and f"fsdp × {then}" in resumed.stderr
    saved = json.loads((runs.root / "runs" / name / "checkpoints/step-0000002/trainer.json").read_text())
    assert saved["world_size"] == first and saved["format"] == "dcp"
    (a, _), (b, _) = read_metrics(runs("fsdp")), read_metrics(runs.root / "runs" / name)
    assert_same_losses(a, b, rel=1e-5)
    assert_close_weights(final_weights(runs("fsdp")), final_weights(runs.root / "runs" / name))
    assert_ema_follows_weights(runs.root / "runs" / name, [1, 2, 3, 4], decay=0.6, start_step=1)


# --------------------------------------------------------------------------- export, init_from


@pytest.mark.slow
def test_export_of_ddp_and_fsdp_checkpoints_of_the_same_training_agree(runs, tmp_path):
    for name in ("ddp", "fsdp"):
        result = run_cli("export", str(runs(name)), str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name / "config.yaml").read_text() == (runs(name) / FINAL / "config.yaml").read_text()
        assert (tmp_path / name / "tokenizer.json").is_file()
    ddp, fsdp = load_file(tmp_path / "ddp/model.safetensors"), load_file(tmp_path / "fsdp/model.safetensors")
    assert all(t.dtype == torch.float32 for t in fsdp.values())
    assert_close_weights(ddp, fsdp)
    # The fsdp export holds exactly the checkpoint's tensors, read back without a process group.
    assert all(torch.equal(fsdp[k], v) for k, v in final_weights(runs("fsdp")).items())


@pytest.mark.slow
def test_init_from_an_fsdp_run_loads_its_weights_under_single_and_fsdp(runs):
    """Two runs start from checkpoints of the same training: one process from the ddp checkpoint, fsdp × 2
    from the fsdp (DCP) checkpoint. They load every tensor and then train alike. Each rank's shard of the fsdp
    checkpoint (saved in the background) has a "weights" part in the manifest, which is what the fsdp × 2 start
    verifies of it, each rank its own shard."""
    files = json.loads((runs("fsdp") / FINAL / "manifest.json").read_text())["files"]
    assert sorted(name for name, entry in files.items() if "weights" in entry.get("parts", {})) == [
        "__0_0.distcp", "__1_0.distcp"]
    out = {}
    for name, nproc, source, extra in [("from-ddp", 1, "ddp", ["train.micro_batch_size=4"]),
                                       ("from-fsdp", 2, "fsdp", [FSDP])]:
        result = start(nproc, "train", str(runs.recipe), f"run.name={name}", f"model.init_from={runs(source)}", *extra)
        assert result.returncode == 0, result.stderr
        report = json.loads((runs.root / "runs" / name / "init_from.json").read_text())
        assert report["new"] == [] and {"tok_emb.weight", "blocks.1.mlp.out_proj.weight"} <= set(report["loaded"])
        out[name] = read_metrics(runs.root / "runs" / name)[0]
    fresh, _ = read_metrics(runs("single"))
    assert out["from-fsdp"][0]["train/loss"] < fresh[0]["train/loss"] - 0.05  # trained weights, not a fresh init
    assert_same_losses(out["from-ddp"], out["from-fsdp"], rel=1e-4)


def test_fsdp_shard_group_size_that_does_not_divide_the_ranks_is_one_line_exit_2_one_process(runs):
    result = run_cli("train", str(runs.recipe), "run.name=bad-hsdp", FSDP, "parallel.shard_group_size=2")
    assert result.returncode == 2
    # The check runs in config validation (or, failing that, when the engine builds its mesh): one line either way.
    assert result.stderr.startswith("bigtrain: error: parallel.shard_group_size=2 must divide")
    assert result.stderr.count("\n") == 1


# --------------------------------------------------------------------------- precision table (one process)


@pytest.fixture
def one_rank_group():
    """FSDP on a single process makes its own 1-rank gloo group; drop it after the test."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_fsdp_real_dtypes_match_the_precision_table(precision, one_rank_group):
    from torch.distributed.tensor import DTensor

    from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
    from bigtrain.models import build_model
    from bigtrain.train.optim import build_optimizer
    from bigtrain.parallel import build_engine, init_distributed, precision_table

    torch.manual_seed(0)
    dist = init_distributed("cpu")
    model = build_model(ModelConfig(preset="debug"), 128, device="meta")
    engine = build_engine(ParallelConfig(precision=precision, strategy="fsdp"), model,
                          lambda m: build_optimizer(OptimConfig(lr=1e-2), m, dist.device), dist)
    table = precision_table(precision, "fsdp")
    assert engine.precision == table
    with engine.autocast():
        logits = engine.model(torch.randint(0, 128, (2, 16)))
    assert logits.dtype == table.compute
    engine.backward(logits.float().logsumexp(-1).mean())
    params = list(engine.module.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    assert {p.grad.dtype for p in params} == {table.grad_reduce}  # sharded grads: reduced in this dtype
    norm = engine.clip_grad_norm(1.0)
    assert not isinstance(norm, DTensor) and torch.isfinite(norm)
    engine.step(True)
    assert {p.dtype for p in params} == {table.param} == {table.master_weights}
    assert {s["exp_avg"].dtype for s in engine.optimizer.state.values()} == {table.optimizer_state}
    assert len(engine.optimizer.state) == len(params)  # the step was taken
    assert (engine.loss_scale is not None) == table.loss_scaling


def test_fsdp_init_on_the_meta_device_equals_the_eager_init(one_rank_group):
    """Sharded DTensor init after to_empty gives exactly the weights of a model built and initialised whole."""
    from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
    from bigtrain.models import build_model
    from bigtrain.train.optim import build_optimizer
    from bigtrain.parallel import build_engine, init_distributed

    dist = init_distributed("cpu")
    torch.manual_seed(7)
    eager = build_model(ModelConfig(preset="debug"), 128)
    torch.manual_seed(7)
    model = build_model(ModelConfig(preset="debug"), 128, device="meta")
    engine = build_engine(ParallelConfig(strategy="fsdp", precision="fp32", activation_checkpointing="full"), model,
                          lambda m: build_optimizer(OptimConfig(), m, dist.device), dist)
    sharded = {k: v.full_tensor() for k, v in engine.module.state_dict().items()}
    assert sharded.keys() == eager.state_dict().keys()
    for name, tensor in eager.state_dict().items():
        assert torch.equal(sharded[name], tensor), name
    assert engine.module.lm_head.weight is engine.module.tok_emb.weight  # still tied after sharding


def test_dcp_checkpoint_reads_back_exactly_and_a_code_running_metadata_pickle_is_refused(tmp_path, one_rank_group,
                                                                                         capsys):
    """open_weights reads a DCP checkpoint's full tensors; a .metadata pickle that names anything beyond DCP's
    metadata types (os.system, or os.system reached as a dotted name through DCP's metadata module, which
    imports os) is a one-line error, exit 2, from export and from resume, and nothing runs."""
    import os
    import pickle

    from bigtrain.checkpoint import open_weights
    from bigtrain.cli import main
    from bigtrain.core.errors import UserError
    from bigtrain.core.filehash import file_entry

    folder, engine = one_process_fsdp_checkpoint(tmp_path / "run")
    reader = open_weights(folder)
    expected = {k: v.full_tensor() for k, v in engine.module.state_dict().items()}
    assert reader.tensors() == {k: (v.dtype, tuple(v.shape)) for k, v in expected.items()}
    assert all(torch.equal(reader.get(k), v) for k, v in expected.items())

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    marker = tmp_path / "ran"
    dotted = (b"\x80\x04ctorch.distributed.checkpoint.metadata\nos.system\n(V" + f"touch {marker}".encode()
              + b"\ntR.")  # GLOBAL of an allowed module with a dotted name: resolved as metadata.os.system
    manifest = json.loads((folder / "manifest.json").read_text())
    for payload in (pickle.dumps(RunsCode()), dotted):
        (folder / ".metadata").write_bytes(payload)
        manifest["files"][".metadata"] = file_entry(folder / ".metadata")  # consistent manifest: a crafted checkpoint
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert main(["export", str(folder), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "which is not allowed in a DCP .metadata" in err and err.count("\n") == 1
        with pytest.raises(UserError, match="which is not allowed in a DCP .metadata"):
            engine.load_state(folder)  # what resume calls
        assert not marker.exists() and not (tmp_path / "out/model.safetensors").exists()


def test_one_process_fsdp_run_destroys_the_group_it_made(tmp_path, cache_dir):
    """A one-process fsdp run makes its own 1-rank group; run_training's shutdown destroys it (no leak into
    whatever runs next in the process)."""
    from bigtrain.config import build_config
    from bigtrain.train.run import run_training

    cfg = build_config(tiny_recipe(cache_dir, tmp_path, train={"max_steps": 1}, parallel={"strategy": "fsdp"},
                                   logging={"every": 1, "progress": False, "wandb": "disabled"}))
    ctx = run_training(cfg)
    assert ctx.state.step == 1
    assert not torch.distributed.is_initialized()
