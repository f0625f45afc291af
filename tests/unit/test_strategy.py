"""Single-process engine: precision table vs real dtypes, fp16 loss scaling and skipped steps."""

from __future__ import annotations

import os

import pytest
import torch

from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from bigtrain.train.accounting import TrainingError, _count_skip
from bigtrain.checkpoint import TrainState
from bigtrain.models import build_model
from bigtrain.train.optim import build_optimizer
from bigtrain.parallel import build_engine, init_distributed, precision_table


def make_engine(precision: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug"), 128)
    dist = init_distributed("cpu")
    return build_engine(ParallelConfig(precision=precision), model,
                        lambda m: build_optimizer(OptimConfig(lr=1e-2), m, dist.device), dist)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-pure"])
def test_real_dtypes_match_the_precision_table(precision):
    engine = make_engine(precision)
    table = precision_table(precision)
    tokens = torch.randint(0, 128, (2, 16))
    with engine.autocast():
        logits = engine.model(tokens)
    assert logits.dtype == table.compute
    engine.backward(logits.float().sum())
    engine.clip_grad_norm(1.0)
    engine.step(True)
    for p in engine.module.parameters():
        assert p.dtype == table.param
    for state in engine.optimizer.state.values():
        assert state["exp_avg"].dtype == table.optimizer_state
    assert (engine.loss_scale is not None) == table.loss_scaling


def test_fp16_overflow_skips_the_update_and_backs_off_the_scale():
    engine = make_engine("fp16")
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    scale = engine.loss_scale
    with engine.autocast():
        loss = engine.model(torch.randint(0, 128, (2, 16))).float().sum()
    engine.backward(loss * float("inf"))
    norm = engine.clip_grad_norm(1.0)
    assert not torch.isfinite(norm)
    engine.step(False)
    assert engine.loss_scale == scale / 2
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("local_overflow", [True, False], ids=["this-rank", "another-rank"])
def test_fp16_scale_halves_after_an_overflow_and_grows_only_after_growth_interval_finite_steps(local_overflow):
    """GradScaler semantics whether this rank saw the inf or only the shared decision says non-finite:
    halve the scale and restart the count of finite steps before it may grow again."""
    from bigtrain.parallel.precision import scaled_optimizer_step

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scales = []
    for finite in (True, True, False, True, True, True, True):
        loss = model(torch.ones(2, 4)).sum() * (float("inf") if not finite and local_overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # what clip_grad_norm does before the shared finite decision
        scaled_optimizer_step(optimizer, scaler, finite)
        scales.append(scaler.get_scale())
    assert scales == [1024.0, 1024.0, 512.0, 512.0, 512.0, 1024.0, 1024.0]


def test_a_device_finite_flag_skips_a_fused_adamw_step_on_the_device(monkeypatch):
    """The loop's finite flag is a device tensor: fused AdamW (CUDA's; CPU has it too) skips through found_inf —
    weights, moments and step count as if the step never ran — and a finite one updates exactly like a plain
    step; an optimizer that cannot skip on the device reads the flag."""
    from bigtrain.parallel.precision import scaled_optimizer_step

    def trained(finite_flags) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
        for finite in finite_flags:
            model(torch.ones(2, 4)).square().sum().backward()
            scaled_optimizer_step(optimizer, None, finite)
            assert not hasattr(optimizer, "found_inf") and model.weight.grad is None
        return model, optimizer

    plain, plain_opt = trained([True, True])
    with monkeypatch.context() as m:  # the flag is never read on the host
        m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("the finite flag was read on the host"))
        skipped, skipped_opt = trained([torch.tensor(True), torch.tensor(False), torch.tensor(True)])
    assert torch.equal(skipped.weight, plain.weight) and torch.equal(skipped.bias, plain.bias)
    for a, b in zip(skipped_opt.state.values(), plain_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq")), (a, b)
    moved, _ = trained([torch.tensor(True)] * 3)
    assert not torch.equal(moved.weight, plain.weight)  # a third applied step moves them
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    scaled_optimizer_step(sgd, None, torch.tensor(False))  # read on the host: skipped all the same
    assert torch.equal(model.weight, before)


def test_non_finite_steps_are_counted_and_stop_after_the_limit():
    cfg = type("Cfg", (), {"train": TrainConfig(max_skipped_steps=3)})()
    state = TrainState(step=5)
    _count_skip(cfg, state, False, float("nan"), float("nan"), None)
    _count_skip(cfg, state, True, 1.0, 1.0, None)  # a good step resets the run of skips
    assert (state.skipped_steps, state.consecutive_skips) == (1, 0)
    for _ in range(2):
        _count_skip(cfg, state, False, float("inf"), float("nan"), None)
    # fp16 overflow with a finite loss: counted, but the scaler is backing off, so not against the limit
    _count_skip(cfg, state, False, 2.0, float("inf"), 1024.0)
    assert (state.skipped_steps, state.consecutive_skips) == (4, 2)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        _count_skip(cfg, state, False, float("nan"), float("nan"), None)


def test_declared_torch_and_deepspeed_lower_bounds_have_the_apis_the_strategies_use():
    """pyproject's lower bounds are the first releases with what bigtrain calls: torch 2.6 (public FSDP2
    fully_shard, get_total_norm / clip_grads_with_norm_, torch.accelerator), DeepSpeed 0.19.8 (a non-finite
    step skipped at every ZeRO stage in fp32 and bf16; bf16.check_grad_overflow). The bounds do not promise
    older ones, and the installed versions have what they name. DeepSpeed and accelerate are extras."""
    import re

    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    from tests.conftest import REPO

    text = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    core = text.split("[project.optional-dependencies]")[0]
    assert "deepspeed" not in core.split("dependencies = [")[1] and "accelerate>=" not in core
    bounds = {name: tuple(int(x) for x in v.split(".")) for name, v in re.findall(r'"(torch|deepspeed)>=([\d.]+)"', text)}
    assert bounds["torch"] >= (2, 6) and bounds["deepspeed"] >= (0, 19, 8)
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    assert torch.nn.utils.get_total_norm and torch.nn.utils.clip_grads_with_norm_ and torch.accelerator.synchronize
    assert "check_grad_overflow" in DeepSpeedBF16Config.model_fields


def test_deepspeed_strategy_without_deepspeed_installed_is_a_one_line_error(monkeypatch):
    import sys

    from bigtrain.core.errors import UserError
    from bigtrain.parallel.deepspeed_checkpoint import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` meets when it is not installed
    with pytest.raises(UserError, match=r"^parallel.strategy=deepspeed needs DeepSpeed, which is not installed — "
                                        r"pip install 'bigtrain\[deepspeed\]'$"):
        import_deepspeed()


def test_deepspeed_bf16_config_accumulates_gradients_in_fp32_and_a_contradicting_key_is_an_error(tmp_path):
    import json

    from bigtrain.config import build_config
    from bigtrain.core.errors import UserError
    from bigtrain.parallel.deepspeed_config import build_deepspeed_config
    from tests.conftest import tiny_recipe

    def config(precision, **ds):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        return build_deepspeed_config(build_config(tiny_recipe(tmp_path, tmp_path, parallel={
            "strategy": "deepspeed", "precision": precision, "deepspeed_config": str(tmp_path / "ds.json")})), 1)

    assert config("bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config("bf16")["bf16"] == {"enabled": True, "check_grad_overflow": True}  # skip non-finite steps
    assert "data_types" not in config("fp32")
    assert config("bf16", data_types={"grad_accum_dtype": "fp32"})["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.raises(UserError, match=r"'data_types.grad_accum_dtype' is \"bf16\" in .* but the recipe gives "
                                        r"\"fp32\" \(parallel.precision\)"):
        config("bf16", data_types={"grad_accum_dtype": "bf16"})


def test_deepspeed_buckets_and_zero3_live_limits_scale_with_the_model_below_their_ceilings(tmp_path):
    """A bucket as large as the model overlaps nothing and fills to the whole gradient, and ZeRO-3's 1e9 reuse
    distance keeps every gathered parameter of a small model resident: each is at most a quarter of the
    parameters (at least 1e6), up to the ceilings a billion-parameter model gets; a deepspeed_config key wins."""
    import json

    from bigtrain.config import build_config
    from bigtrain.parallel.deepspeed_config import build_deepspeed_config
    from tests.conftest import tiny_recipe

    def zero(n_params, **ds):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        recipe = build_config(tiny_recipe(tmp_path, tmp_path, parallel={
            "strategy": "deepspeed", "zero_stage": 3, "deepspeed_config": str(tmp_path / "ds.json")}))
        return build_deepspeed_config(recipe, 2, n_params)["zero_optimization"]

    keys = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters", "stage3_max_reuse_distance")
    assert [zero(None)[k] for k in keys] == [200_000_000, 200_000_000, 50_000_000, 1_000_000_000, 1_000_000_000]
    assert [zero(8_000_000_000)[k] for k in keys] == [200_000_000, 200_000_000, 50_000_000, 1_000_000_000, 1_000_000_000]
    assert [zero(135_500_000)[k] for k in keys] == [33_875_000] * 5
    assert [zero(100_000)[k] for k in keys] == [1_000_000] * 5
    assert zero(135_500_000, zero_optimization={"reduce_bucket_size": 5})["reduce_bucket_size"] == 5


# The Hugging Face Trainer's ds_config_zero3.json (its DeepSpeed docs), "auto" wherever it has one.
HF_ZERO3_CONFIG = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none", "pin_memory": True},
                          "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                          "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def test_deepspeed_config_auto_values_take_the_recipes_and_one_it_cannot_fill_is_an_error(tmp_path):
    """A Hugging Face ds_config.json works as it is: its "auto" values become the recipe's (batch sizes, accumulation,
    clipping, precision, model-sized buckets); its optimizer and scheduler sections, which describe the AdamW and LR
    bigtrain itself runs, are checked against optim.* and left out; a contradiction or an "auto" bigtrain cannot
    fill is a one-line error naming the key."""
    import json

    from bigtrain.config import build_config
    from bigtrain.core.errors import UserError
    from bigtrain.parallel.deepspeed_config import build_deepspeed_config
    from tests.conftest import tiny_recipe

    def config(ds, precision="bf16", **optim):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        recipe = build_config(tiny_recipe(tmp_path, tmp_path, optim={"schedule": "linear", **optim}, parallel={
            "strategy": "deepspeed", "zero_stage": 3, "precision": precision,
            "deepspeed_config": str(tmp_path / "ds.json")}, train={"global_batch_size": 16, "micro_batch_size": 2}))
        return build_deepspeed_config(recipe, 2, 135_500_000)

    got = config(HF_ZERO3_CONFIG)
    assert (got["train_batch_size"], got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"]) == (16, 2, 4)
    assert got["gradient_clipping"] == 1.0 and got["bf16"]["enabled"] is True and got["fp16"]["enabled"] is False
    zero = got["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 33_875_000  # as without the file
    assert "stage3_param_persistence_threshold" not in zero  # DeepSpeed's own default
    assert zero["sub_group_size"] == 1e9 and zero["stage3_max_live_parameters"] == 1e9  # the file's own values
    assert "optimizer" not in got and "scheduler" not in got  # bigtrain steps its AdamW and sets the LR itself
    assert "auto" not in json.dumps(got)
    assert config(HF_ZERO3_CONFIG, precision="fp32")["bf16"]["enabled"] is False

    path = tmp_path / "ds.json"
    explicit = {**HF_ZERO3_CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}}}
    assert "optimizer" not in config(explicit)  # the recipe's defaults: agrees
    for ds, line in (
        ({**HF_ZERO3_CONFIG, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
         f"'optimizer.params.lr' is 0.001 in {path} but the recipe gives 0.003 (optim.lr)"),
        ({**HF_ZERO3_CONFIG, "scheduler": {"type": "WarmupCosineLR"}},
         f"'scheduler.type' is \"WarmupCosineLR\" in {path} but the recipe gives \"linear\" (optim.schedule)"),
        ({**HF_ZERO3_CONFIG, "optimizer": {"type": "Lamb"}},
         f"'optimizer.type' is \"Lamb\" in {path}, which bigtrain cannot train with (it steps its own AdamW and LR "
         f"schedule, optim.*) — remove the key from {path}"),
        ({**HF_ZERO3_CONFIG, "zero_optimization": {"sub_group_size": "auto"}},
         f"'zero_optimization.sub_group_size' is \"auto\" in {path}, which bigtrain cannot fill — give it a value "
         f"or remove it"),
        ({**HF_ZERO3_CONFIG, "train_batch_size": 32},
         f"'train_batch_size' is 32 in {path} but the recipe gives 16 (train.global_batch_size)"),
    ):
        with pytest.raises(UserError) as raised:
            config(ds)
        assert str(raised.value) == f"parallel.deepspeed_config: {line}" + (
            "" if "cannot" in line else f" — remove the key from {path} or change the recipe")


def test_ddp_skips_the_buffer_broadcast_and_keeps_gradients_as_bucket_views():
    """RoPE tables are identical on every rank (no broadcast each forward); gradients live in DDP's buckets."""
    import torch.distributed as torch_dist

    from bigtrain.parallel.dist import Dist
    from bigtrain.parallel.local import LocalEngine

    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        dist = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
        model = build_model(ModelConfig(preset="debug"), 128)
        engine = LocalEngine(model, lambda m: build_optimizer(OptimConfig(), m, dist.device), dist=dist,
                             precision=precision_table("fp32"), parallel_cfg=ParallelConfig(strategy="ddp"))
        sync = getattr(engine.model, "forward_sync_buffers", None)  # newer torch's name for broadcast_buffers
        assert (engine.model.broadcast_buffers if sync is None else sync) is False
        assert engine.model.gradient_as_bucket_view is True
    finally:
        torch_dist.destroy_process_group()


def test_tf32_is_switched_on_cuda_only_as_parallel_tf32_says(monkeypatch):
    from bigtrain.parallel import local
    from bigtrain.parallel.dist import use_tf32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    try:
        for enabled in (True, False, True):
            was = flags()
            use_tf32(torch.device("cpu"), not was[0])
            assert flags() == was  # on a CPU nothing changes
            use_tf32(torch.device("cuda", 0), enabled)  # only flags: no CUDA needed to set them
            assert flags() == (enabled, enabled)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    calls = []
    monkeypatch.setattr(local, "use_tf32", lambda device, enabled: calls.append((device.type, enabled)))
    for tf32 in (True, False):
        dist = init_distributed("cpu")
        build_engine(ParallelConfig(precision="fp32", tf32=tf32), build_model(ModelConfig(preset="debug"), 128),
                     lambda m: build_optimizer(OptimConfig(), m, dist.device), dist)
    assert calls == [("cpu", True), ("cpu", False)] and ParallelConfig().tf32 is True


def test_inductor_cache_folder_is_keyed_by_cpu_capability_once(monkeypatch, tmp_path):
    """A worker inherits its parent's keyed folder: no second capability level."""
    from bigtrain.parallel.transforms import key_inductor_cache_by_cpu

    capability = f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    assert key_inductor_cache_by_cpu() == tmp_path / "shared" / capability
    assert key_inductor_cache_by_cpu() == tmp_path / "shared" / capability
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared" / capability)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert key_inductor_cache_by_cpu().name == capability



@pytest.mark.parametrize("next_step", [2, 1], ids=["new-step", "same-step"])
def test_a_save_killed_at_any_filesystem_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch, next_step):
    """keep_last=1: a save of the next step (or a re-save of the same step, as a resumed finished run does)
    killed at each rename or delete in turn still leaves one complete checkpoint to resume from."""
    import shutil

    from bigtrain import checkpoint
    from bigtrain.config import Config, dump_yaml

    class Killed(Exception):
        pass

    engine = make_engine("fp32")
    real = {"replace": os.replace, "rmtree": shutil.rmtree}
    kill_at = 1
    while True:
        run_dir = tmp_path / f"run-{kill_at}"
        checkpoint.save(run_dir, TrainState(step=1), engine, engine.dist, config_yaml=dump_yaml(Config()), keep_last=1)
        calls = [0]

        def dying(name):
            def op(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    raise Killed(name)
                return real[name](*args, **kwargs)
            return op

        monkeypatch.setattr(os, "replace", dying("replace"))
        monkeypatch.setattr(shutil, "rmtree", dying("rmtree"))
        try:
            checkpoint.save(run_dir, TrainState(step=next_step), engine, engine.dist,
                            config_yaml=dump_yaml(Config()), keep_last=1)
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real["replace"])
            monkeypatch.setattr(shutil, "rmtree", real["rmtree"])
        folder = checkpoint.find_resume_checkpoint("auto", run_dir, warn=lambda m: None)
        assert folder is not None, f"no checkpoint left when killed at filesystem step {kill_at}"
        checkpoint.verify(folder)
        if finished:
            assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [f"step-{next_step:07d}"]
            break
        kill_at += 1
    assert kill_at >= 3  # the manifest's rename, the step-aside or publish rename, the deletes


def test_checkpoint_hashing_shares_every_file_once_balanced_by_size():
    from bigtrain.checkpoint.manifest import _shares

    files = [("a", 100), ("b", 60), ("c", 50), ("d", 40), ("e", 10), ("f", 0)]
    shares = _shares(files, 3)
    assert sorted(name for share in shares for name in share) == ["a", "b", "c", "d", "e", "f"]
    sizes = dict(files)
    assert sorted(sum(sizes[n] for n in share) for share in shares) == [70, 90, 100]  # a; b+e+f; c+d
    assert _shares(files, 1) == [["a", "b", "c", "d", "e", "f"]]


def test_files_hashed_while_written_are_not_read_back_for_the_manifest(tmp_path):
    """filehash.save / DCP's writer record each file's sha256 as its bytes go out; hash_files takes the record
    while the file is unchanged (size, mtime, inode) and reads back only the rest. Shown by rewriting a recorded
    file in place behind its back (same size, mtime put back): the manifest keeps the written bytes' digest."""
    import hashlib

    import torch.distributed.checkpoint as dcp

    from bigtrain.core import filehash
    from bigtrain.checkpoint import hash_files
    from bigtrain.parallel import Dist
    from bigtrain.parallel.fsdp import _HashingWriter

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    dist = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    filehash.save({"w": torch.arange(1000.0)}, folder / "model.pt")
    dcp.save({"m": {"w": torch.ones(64, 8)}}, storage_writer=_HashingWriter(folder / "dcp"), no_dist=True)
    (folder / "trainer.json").write_text("{}")  # written plainly: read back
    written = {name: digest(folder / name) for name in ("model.pt", "dcp/.metadata", "dcp/__0_0.distcp", "trainer.json")}
    assert {name: filehash.known(folder / name) for name in written} == {
        **{name: {"bytes": (folder / name).stat().st_size, "sha256": written[name]} for name in written},
        "trainer.json": None}
    assert torch.load(folder / "model.pt", weights_only=True)["w"].equal(torch.arange(1000.0))

    model = folder / "model.pt"
    info = model.stat()
    raw = bytearray(model.read_bytes())
    raw[-1] ^= 0xFF
    with open(model, "r+b") as f:  # the same inode and size
        f.write(raw)
    os.utime(model, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert digest(model) != written["model.pt"]
    entries = hash_files(folder, dist)
    assert {name: entry["sha256"] for name, entry in entries.items()} == written  # model.pt not read again
    assert filehash.known(model) is None  # the records go with the manifest
    assert hash_files(folder, dist)["model.pt"]["sha256"] == digest(model)  # unrecorded: read back

    filehash.save({"w": torch.zeros(3)}, model)
    model.write_bytes(model.read_bytes())  # rewritten by someone else (new mtime): the record is not trusted
    assert filehash.known(model) is None


def test_deepspeed_checkpoint_files_are_hashed_as_deepspeed_writes_them(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from bigtrain.core import filehash
    from bigtrain.parallel.deepspeed_checkpoint import _hashing_saves

    engine = TorchCheckpointEngine()
    engine.zipfile_serialization = True  # DeepSpeed's default serialization
    with _hashing_saves(engine):
        engine.save(state_dict={"w": torch.arange(10.0)}, path=str(tmp_path / "states.pt"))  # as DeepSpeed calls it
    assert filehash.known(tmp_path / "states.pt") == filehash.file_entry(tmp_path / "states.pt") is not None
    assert torch.load(tmp_path / "states.pt", weights_only=True)["w"].equal(torch.arange(10.0))
    engine.save({"w": torch.zeros(1)}, str(tmp_path / "after.pt"))  # outside: DeepSpeed's own save again
    assert filehash.known(tmp_path / "after.pt") is None


def test_async_save_copies_the_state_at_the_call_and_the_next_save_waits_for_it(tmp_path, capsys):
    """checkpoint.async_save: save() returns before anything is published; training may change the weights
    meanwhile, yet the checkpoint holds them as they were at the call. A synchronous save (preemption) waits for
    the one in flight first. A background failure is raised by wait(), publishes nothing, and close() reports it."""
    import threading

    from bigtrain import checkpoint
    from bigtrain.config import Config, dump_yaml
    from bigtrain.parallel.local import in_background

    engine = make_engine("fp32")
    engine.backward(engine.model(torch.randint(0, 128, (2, 16))).sum())
    engine.step(True)  # Adam state to copy as well
    gate, real = threading.Event(), engine.save_state_async

    def held_back(folder, group):  # the copy now, as always; the files only once the gate opens
        written = real(folder, group)
        return in_background(lambda: (gate.wait(30), written.result()))

    engine.save_state_async = held_back
    saver = checkpoint.Checkpointer(tmp_path, engine, engine.dist, config_yaml=dump_yaml(Config()), keep_last=0)
    at_call = {k: v.clone() for k, v in engine.module.state_dict().items()}
    saver.save(TrainState(step=1))
    assert checkpoint.list_checkpoints(tmp_path) == [] and (tmp_path / "checkpoints/.tmp-step-0000001").is_dir()
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)  # the next optimizer steps
    gate.set()
    saver.save(TrainState(step=2), sync=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
    for folder in checkpoint.list_checkpoints(tmp_path):
        checkpoint.verify(folder)
    saved = torch.load(tmp_path / "checkpoints/step-0000001/model.pt", weights_only=True)
    assert all(torch.equal(saved[k], at_call[k]) for k in at_call)
    assert [(r["step"], r["async"]) for r in saver.history] == [(1, True), (2, False)]

    engine.save_state_async = lambda folder, group: in_background(lambda: 1 / 0)  # e.g. the disk is full
    saver.save(TrainState(step=3))
    with pytest.raises(ZeroDivisionError):
        saver.wait()
    assert checkpoint.find_resume_checkpoint("auto", tmp_path).name == "step-0000002"
    saver.save(TrainState(step=4))
    saver.close()
    assert "the checkpoint save in flight failed" in capsys.readouterr().err


def test_each_rank_verifies_the_files_it_loads_next():
    """A rank's own shard, partitions, rng and EMA files go to that rank (it reads them next when it loads them, so
    on separate nodes verification adds no second read); files of ranks this job lacks, and shared ones, by size."""
    from bigtrain.checkpoint.manifest import _shares

    files = [("__0_0.distcp", 500), ("__1_0.distcp", 520), (".metadata", 5), ("rng/rank-00000.pt", 1),
             ("rng/rank-00001.pt", 1), ("deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", 300),
             ("deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", 300), ("ema-rank-00001.pt", 9),
             ("__2_0.distcp", 400), ("trainer.json", 2)]
    shares = _shares(files, 2)
    assert {"__0_0.distcp", "rng/rank-00000.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(shares[0])
    assert {"__1_0.distcp", "rng/rank-00001.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "ema-rank-00001.pt"} <= set(shares[1])
    assert "__2_0.distcp" in shares[0]  # no rank 2 here: the less loaded rank takes it
    ddp = _shares([("model.pt", 300), ("optimizer.pt", 600), ("rng/rank-00001.pt", 1), ("trainer.json", 2)], 2)
    assert {"model.pt", "optimizer.pt"} <= set(ddp[0]) and "rng/rank-00001.pt" in ddp[1]  # rank 0 loads, broadcasts
    assert sorted(n for share in shares for n in share) == sorted(n for n, _ in files)
