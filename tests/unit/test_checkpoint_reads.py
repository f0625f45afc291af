"""What a rank reads of a checkpoint (bigtrain/checkpoint/manifest.py and weights.py, the format readers): model.init_from verifies only the
files it reads, each once, and finds a tensor's name without reading it; a DCP folder's .metadata is unpickled once
per reader, not once per tensor."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bigtrain import checkpoint

from bigtrain.core import filehash
from bigtrain.cli import main
from tests.conftest import tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def init_run(tmp_path_factory, cache_dir) -> Path:
    """A 2-step single-process run with one checkpoint (step 2) to start others from."""
    root = tmp_path_factory.mktemp("init-run")
    recipe = write_recipe(root / "r.yaml", tiny_recipe(cache_dir, root / "runs", train={"max_steps": 2},
                                                       checkpoint={"every": 2}))
    assert main(["train", str(recipe), "run.name=base"]) == 0
    return root / "runs" / "base"


def start_from(tmp_path: Path, cache_dir: Path, init_from: Path, monkeypatch, key: str = "model.init_from"
               ) -> tuple[int, list[Path]]:
    """(exit code, files sha256-read under `init_from`) of a 1-step run from `init_from` (`key`: model.init_from, or
    task.teacher of a distillation run)."""
    hashed, real = [], filehash.sha256
    monkeypatch.setattr(filehash, "sha256", lambda path: hashed.append(Path(path)) or real(path))
    task = {"name": "distill"} if key == "task.teacher" else {}
    tmp_path.mkdir(exist_ok=True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", train={"max_steps": 1},
                                                           task=task))
    code = main(["train", str(recipe), "run.name=fine", f"{key}={init_from}"])
    return code, [p for p in hashed if p.is_relative_to(init_from)]


def damage(path: Path) -> bytes:
    """Flip a byte in the middle of `path` (same size); returns the original bytes."""
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    return data


def test_init_from_verifies_only_the_files_it_reads_each_once(tmp_path, cache_dir, init_run, monkeypatch):
    """The optimizer state and rng files are never read, so never hashed (a damaged one does not stop the run);
    the weights, tokenizer, config.yaml and trainer.json are hashed once each, though the tokenizer is looked up
    before the process group exists and the weights after."""
    folder = checkpoint.list_checkpoints(init_run)[-1]
    original = damage(folder / "optimizer.pt")
    try:
        code, hashed = start_from(tmp_path, cache_dir, init_run, monkeypatch)
    finally:
        (folder / "optimizer.pt").write_bytes(original)
    assert code == 0
    assert sorted(p.relative_to(folder).as_posix() for p in hashed) == [
        "config.yaml", "model.pt", "tokenizer.json", "trainer.json"]


@pytest.mark.parametrize("key", ["model.init_from", "task.teacher"])
def test_a_damaged_weights_file_to_start_from_is_one_line_exit_2(tmp_path, cache_dir, init_run, monkeypatch, capsys,
                                                                 key):
    folder = checkpoint.list_checkpoints(init_run)[-1]
    original = damage(folder / "model.pt")
    try:
        capsys.readouterr()
        code, _ = start_from(tmp_path, cache_dir, init_run, monkeypatch, key)
    finally:
        (folder / "model.pt").write_bytes(original)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (
        f"bigtrain: error: {key}: corrupted checkpoint file {folder / 'model.pt'}: sha256 does not match "
        f"the manifest — point {key} at an intact checkpoint")
    assert not (tmp_path / "runs" / "fine" / "checkpoints").exists()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, cache_dir) -> Path:
    """A 1-step fsdp run (one process) with its checkpoint: a DCP shard holding model and Adam state together."""
    root = tmp_path_factory.mktemp("fsdp-run")
    recipe = write_recipe(root / "r.yaml", tiny_recipe(cache_dir, root / "runs", train={"max_steps": 1},
                                                       checkpoint={"every": 1, "async_save": False}))
    assert main(["train", str(recipe), "run.name=base", "parallel.strategy=fsdp"]) == 0
    return root / "runs" / "base"


def dcp_item_middle(folder: Path, prefix: str) -> int:
    """The offset of the middle of the first item of `folder`'s DCP shard whose name starts with `prefix`."""
    from bigtrain.parallel.fsdp import SafeReader

    where = next(w for index, w in SafeReader(str(folder)).read_metadata().storage_data.items()
                 if index.fqn.startswith(prefix))
    assert where.relative_path == "__0_0.distcp"
    return where.offset + where.length // 2


def flip(path: Path, at: int) -> bytes:
    """Flip the byte at offset `at` of `path` (same size); returns the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    return data


def test_fsdp_init_from_verifies_only_the_weights_of_a_shard(tmp_path, cache_dir, fsdp_run, monkeypatch, capsys):
    """A DCP shard holds the model and its Adam state; init_from checks just its model items against the manifest's
    "weights" part (the shard is never sha256-read whole), so a damaged optimizer byte does not stop it, though a
    resume still refuses the checkpoint; a damaged weights byte is the one-line exit 2 naming the shard."""
    folder = checkpoint.list_checkpoints(fsdp_run)[-1]
    shard = folder / "__0_0.distcp"
    entry = json.loads((folder / "manifest.json").read_text())["files"]["__0_0.distcp"]
    assert set(entry["parts"]) == {"weights"} and len(entry["parts"]["weights"]) == 64

    original = flip(shard, dcp_item_middle(folder, "optim.state."))
    try:
        code, hashed = start_from(tmp_path / "a", cache_dir, fsdp_run, monkeypatch)
        with pytest.raises(checkpoint.CheckpointError, match="corrupted checkpoint file .*__0_0.distcp: sha256 does"):
            checkpoint.verify(folder)
    finally:
        shard.write_bytes(original)
    assert code == 0
    assert shard not in hashed and folder / ".metadata" in hashed

    original = flip(shard, dcp_item_middle(folder, "model."))
    try:
        capsys.readouterr()
        code, _ = start_from(tmp_path / "b", cache_dir, fsdp_run, monkeypatch)
    finally:
        shard.write_bytes(original)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (
        f"bigtrain: error: model.init_from: corrupted checkpoint file {shard}: sha256 of its weights does not match "
        f"the manifest — point model.init_from at an intact checkpoint")

    # A crafted .metadata (with a consistent manifest), which the weights check reads for the items' ranges: refused,
    # as one line on every rank.
    manifest, metadata = (folder / "manifest.json").read_text(), (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    crafted = json.loads(manifest)
    crafted["files"][".metadata"] = filehash.file_entry(folder / ".metadata")
    (folder / "manifest.json").write_text(json.dumps(crafted))
    try:
        code, _ = start_from(tmp_path / "c", cache_dir, fsdp_run, monkeypatch)
    finally:
        (folder / ".metadata").write_bytes(metadata)
        (folder / "manifest.json").write_text(manifest)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "ran").exists()
    assert "which is not allowed in a DCP .metadata" in err.rstrip().splitlines()[-1]


class RunsCode:
    """Unpickled, it would create a file (a crafted checkpoint's payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_init_from_a_checkpoint_without_weights_parts_verifies_whole_shards(tmp_path, cache_dir, fsdp_run,
                                                                           monkeypatch, capsys):
    """A checkpoint saved before manifests had parts: init_from loads it as before, checking each shard whole, so a
    damaged optimizer byte in it is refused (one line, exit 2)."""
    folder = checkpoint.list_checkpoints(fsdp_run)[-1]
    manifest = (folder / "manifest.json").read_text()
    old = json.loads(manifest)
    assert [name for name, entry in old["files"].items() if entry.pop("parts", None)] == ["__0_0.distcp"]
    (folder / "manifest.json").write_text(json.dumps(old))
    try:
        code, hashed = start_from(tmp_path / "a", cache_dir, fsdp_run, monkeypatch)
        assert code == 0 and folder / "__0_0.distcp" in hashed
        original = flip(folder / "__0_0.distcp", dcp_item_middle(folder, "optim.state."))
        try:
            capsys.readouterr()
            code, _ = start_from(tmp_path / "b", cache_dir, fsdp_run, monkeypatch)
        finally:
            (folder / "__0_0.distcp").write_bytes(original)
    finally:
        (folder / "manifest.json").write_text(manifest)
    assert code == 2
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == (
        f"bigtrain: error: model.init_from: corrupted checkpoint file {folder / '__0_0.distcp'}: sha256 does not "
        f"match the manifest — point model.init_from at an intact checkpoint")


class CountingReader:
    """A WeightsReader over a dict, counting the tensors read."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors, self.reads = tensors, 0

    def tensors(self):
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        self.reads += 1
        return self._tensors[name]


def test_membership_in_lazy_weights_reads_nothing():
    """DeepSpeed's loader asks `name in weights` of every model tensor on every rank: that must not read it."""
    reader = CountingReader({"a": torch.ones(2), "b": torch.zeros(3)})
    weights = checkpoint.LazyWeights(reader, {"x.a": "a", "x.b": "b"})
    assert ("x.a" in weights, "x.b" in weights, "a" in weights, "x.c" in weights) == (True, True, False, False)
    assert reader.reads == 0
    assert torch.equal(weights["x.b"], torch.zeros(3)) and reader.reads == 1


def test_dcp_weights_unpickle_metadata_once_per_reader(tmp_path, monkeypatch):
    """DCPWeights reads a DCP folder's .metadata when opened, and every tensor it assembles after uses that."""
    import torch.distributed.checkpoint as dcp

    from bigtrain.parallel import fsdp

    state = {f"model.layer{i}.weight": torch.full((4, 3), float(i)) for i in range(5)}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    unpickled, real = [], fsdp.SafeReader.read_metadata
    monkeypatch.setattr(fsdp.SafeReader, "read_metadata",
                        lambda self, *args, **kwargs: unpickled.append(1) or real(self, *args, **kwargs))
    weights = fsdp.open_weights(tmp_path)
    got = {name: weights.get(name) for name in weights.tensors()}
    assert len(unpickled) == 1
    assert {f"model.{name}": t for name, t in got.items()}.keys() == state.keys()
    assert all(torch.equal(got[name.removeprefix("model.")], t) for name, t in state.items())


TWO_RANKS_SCRIPT = '''
import json, os, sys
from pathlib import Path
import torch
from bigtrain import checkpoint
from bigtrain.checkpoint.store import _publish, _start
from bigtrain.core import filehash
from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
from bigtrain.models import build_model
from bigtrain.train.optim import build_optimizer
from bigtrain.parallel import barrier, build_engine, init_distributed

dist = init_distributed("cpu")
out = Path(sys.argv[1])

# A save: which files each rank fsyncs.
tmp, final = _start(out / "run", 1, dist)
filehash.save({"x": torch.ones(3) * dist.rank}, tmp / f"shard-{dist.rank}.pt")  # each rank its file, recorded
if dist.is_main:
    (tmp / "trainer.json").write_text("{}")  # rank 0's own, not recorded
synced, real = [], os.fsync
os.fsync = lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
_publish(tmp, final, checkpoint.TrainState(step=1), dist, keep_last=0,
         verified=checkpoint.VerifiedCheckpoints())
os.fsync = real
names = [os.path.relpath(p, tmp) if p.startswith(str(tmp)) else os.path.relpath(p, final) for p in synced]

# init_from under ddp: which tensors each rank reads, and what each replica holds after.
torch.manual_seed(1)
source = build_model(ModelConfig(preset="debug"), 128).state_dict()
class Counting:
    reads = 0
    def get(self, name):
        Counting.reads += 1
        return source[name]
torch.manual_seed(2 + dist.rank)  # each replica starts different
model = build_model(ModelConfig(preset="debug"), 128)
engine = build_engine(ParallelConfig(strategy="ddp", precision="fp32"), model,
                      lambda m: build_optimizer(OptimConfig(lr=1e-3), m, dist.device), dist)
engine.load_model_weights(checkpoint.LazyWeights(Counting(), {name: name for name in source}))
same = all(torch.equal(t, source[name]) for name, t in engine.module.state_dict().items())

# resume under ddp: which files each rank torch.loads, and what each replica holds after.
for p in engine.module.parameters():
    p.grad = torch.full_like(p, 0.5)
engine.optimizer.step()  # Adam moments to save
folder = out / "state"
folder.mkdir(exist_ok=True)
engine.save_state(folder)
barrier(dist)
torch.manual_seed(5 + dist.rank)
fresh = build_engine(ParallelConfig(strategy="ddp", precision="fp32"), build_model(ModelConfig(preset="debug"), 128),
                     lambda m: build_optimizer(OptimConfig(lr=1e-3), m, dist.device), dist)
loaded, real_load = [], torch.load
torch.load = lambda f, *a, **k: loaded.append(Path(f).name) or real_load(f, *a, **k)
fresh.load_state(folder)
torch.load = real_load
resumed = all(torch.equal(a, b) for a, b in zip(fresh.module.state_dict().values(), engine.module.state_dict().values()))
moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(fresh.optimizer.state.values(), engine.optimizer.state.values())]
resumed = resumed and len(moments) == len(list(engine.module.parameters())) and all(torch.equal(a, b) for a, b in moments)
(out / f"rank-{dist.rank}.json").write_text(json.dumps({"fsynced": names, "reads": Counting.reads, "loaded": same,
                                                        "tensors": len(source), "resume_loads": loaded,
                                                        "resumed": resumed}))
'''


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """One 2-process torchrun job (gloo) of TWO_RANKS_SCRIPT; each rank's findings, in rank order."""
    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("two-ranks")
    (out / "two_ranks.py").write_text(TWO_RANKS_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(out / "two_ranks.py"), str(out)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # starts 2 processes
def test_each_rank_fsyncs_the_files_it_wrote_and_rank_0_the_folders(two_ranks):
    """A save's files are on disk before its manifest (every file fsynced once), each by the process that wrote it;
    the folders by rank 0. (Before: every rank fsynced every file of the checkpoint.)"""
    rank0, rank1 = (r["fsynced"] for r in two_ranks)
    assert rank1 == ["shard-1.pt"]
    # rank 0: its file, the one it wrote unrecorded, the folders ("." twice: before and after the manifest), the
    # manifest as it is written, and the checkpoints folder after the rename ("..")
    manifest_part = [name for name in rank0 if name.startswith(".manifest.json.tmp-")]  # fsio.write_atomic's
    assert len(manifest_part) == 1
    assert sorted(rank0) == sorted(["shard-0.pt", "trainer.json", ".", "rng", *manifest_part, ".", ".."])


@pytest.mark.slow  # starts 2 processes
def test_ddp_resume_is_read_by_rank_0_and_broadcast(two_ranks):
    """A ddp resume: rank 0 alone torch.loads model.pt and optimizer.pt; the other replica receives the same model
    and Adam state."""
    assert [r["resume_loads"] for r in two_ranks] == [["model.pt", "optimizer.pt"], []]
    assert all(r["resumed"] for r in two_ranks)


@pytest.mark.slow  # starts 2 processes
def test_ddp_init_from_is_read_by_rank_0_and_broadcast(two_ranks):
    """Under ddp every rank holds the whole model, but only rank 0 reads the init_from tensors (once each); the
    other replica receives them, and both end up equal to the checkpoint."""
    assert [r["reads"] for r in two_ranks] == [two_ranks[0]["tensors"], 0]
    assert all(r["loaded"] for r in two_ranks)


def test_an_fsdp_resume_unpickles_metadata_once(tmp_path, monkeypatch):
    """FSDPEngine.load_state reads .metadata once (it needs it to see whether the EMA was saved) and hands it to
    dcp.load, which would read it again."""
    from bigtrain.checkpoint import TrainState, save
    from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig
    from bigtrain.models import build_model
    from bigtrain.train.optim import build_optimizer
    from bigtrain.parallel import build_engine, fsdp, init_distributed

    torch.manual_seed(0)
    dist = init_distributed("cpu")
    try:
        engine = build_engine(ParallelConfig(strategy="fsdp", precision="fp32"),
                              build_model(ModelConfig(preset="debug"), 128, device="meta"),
                              lambda m: build_optimizer(OptimConfig(), m, dist.device), dist)
        folder = save(tmp_path / "run", TrainState(step=1), engine, dist, config_yaml="{}\n", keep_last=0)
        before = {k: v.full_tensor().clone() for k, v in engine.module.state_dict().items()}
        with torch.no_grad():
            for p in engine.module.parameters():
                p.zero_()
        unpickled, real = [], fsdp.SafeReader.read_metadata
        monkeypatch.setattr(fsdp.SafeReader, "read_metadata",
                            lambda self, *args, **kwargs: unpickled.append(1) or real(self, *args, **kwargs))
        engine.load_state(folder)
        assert len(unpickled) == 1
        assert all(torch.equal(v.full_tensor(), before[k]) for k, v in engine.module.state_dict().items())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
