"""`bigtrain export`: streaming safetensors writer, single-process checkpoints, bad sources."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint import TrainState, save
from bigtrain.cli import main
from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
from bigtrain.checkpoint.export import export
from bigtrain.interop.safetensors_file import write_safetensors
from bigtrain.models import build_model
from bigtrain.train.optim import build_optimizer
from bigtrain.checkpoint import open_weights
from bigtrain.parallel import build_engine, init_distributed


class DictReader:
    """A WeightsReader over an in-memory dict, counting reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.data, self.reads = tensors, []

    def tensors(self):
        return {k: (v.dtype, tuple(v.shape)) for k, v in self.data.items()}

    def get(self, name):
        self.reads.append(name)
        return self.data[name]


def single_checkpoint(tmp_path, precision: str = "fp32", labels: list[str] | None = None):
    """A real single-process checkpoint (model.pt, optimizer, manifest, tokenizer) after one update."""
    torch.manual_seed(0)
    dist = init_distributed("cpu")
    model = build_model(ModelConfig(preset="debug"), 128)
    engine = build_engine(ParallelConfig(precision=precision), model,
                          lambda m: build_optimizer(OptimConfig(lr=1e-2), m, dist.device), dist)
    with engine.autocast():
        loss = engine.model(torch.randint(0, 128, (2, 16))).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.clip_grad_norm(1.0)
    engine.step(True)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"fake": "tokenizer"}')
    extra = {"tokenizer.json": tokenizer}
    if labels:
        (tmp_path / "labels.json").write_text(json.dumps(labels))
        extra["labels.json"] = tmp_path / "labels.json"
    run_dir = tmp_path / "run"
    folder = save(run_dir, TrainState(step=1, samples_consumed=2), engine, dist,
                  config_yaml="model:\n  preset: debug\n", keep_last=0, extra_files=extra)
    return run_dir, folder


def test_streamed_file_loads_with_safetensors_and_is_8_byte_aligned(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.weight": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "empty": torch.empty(0, 4), "half": torch.randn(2, 2).half()}
    reader = DictReader(tensors)
    write_safetensors(tmp_path / "m.safetensors", reader, metadata={"format": "pt"})
    raw = (tmp_path / "m.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["b.weight"]["dtype"] == "BF16" and header["c"]["dtype"] == "I64"
    loaded = load_file(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert reader.reads == list(tensors)  # each tensor read once, in header order (streaming)
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_export_of_a_single_process_checkpoint_equals_model_pt_exactly(tmp_path, precision):
    run_dir, folder = single_checkpoint(tmp_path, precision)
    out = export(run_dir, tmp_path / "out")  # a run dir means its newest complete checkpoint
    exported = load_file(out / "model.safetensors")
    saved = torch.load(folder / "model.pt", weights_only=True)
    assert exported.keys() == saved.keys()  # tied weights under both names, like the state dict
    for name, tensor in saved.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert (out / "config.yaml").read_text() == "model:\n  preset: debug\n"
    assert not (out / "labels.json").exists()
    # The export loads into a fresh model with strict=True (tied head included).
    model = build_model(ModelConfig(preset="debug"), 128).to(saved["tok_emb.weight"].dtype)
    model.load_state_dict(exported, strict=True)


def test_export_cli_from_a_checkpoint_folder_brings_the_labels(tmp_path, capsys):
    _, folder = single_checkpoint(tmp_path, labels=["json", "os"])
    assert main(["export", str(folder), str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().err
    assert json.loads((tmp_path / "out/labels.json").read_text()) == ["json", "os"]
    reader = open_weights(folder)
    exported = load_file(tmp_path / "out/model.safetensors")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in exported.items()} == reader.tensors()


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing",  # no such path
    lambda tmp: (tmp / "empty-run").mkdir() or tmp / "empty-run",  # a folder without checkpoints
])
def test_export_of_a_bad_source_is_one_line_exit_2(tmp_path, capsys, make):
    source = make(tmp_path)
    assert main(["export", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigtrain: error: export:") and err.count("\n") == 1 and str(source) in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_export_of_a_damaged_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    _, folder = single_checkpoint(tmp_path)
    with open(folder / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and err.count("\n") == 1


def test_export_ema_of_a_checkpoint_without_ema_weights_is_one_line_exit_2(tmp_path, capsys):
    _, folder = single_checkpoint(tmp_path)
    assert main(["export", str(folder), str(tmp_path / "out"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint {folder} has no EMA weights — train with optim.ema_decay" in err
    assert not (tmp_path / "out").exists()
