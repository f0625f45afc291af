"""A DeepSpeed checkpoint inside a bigtrain checkpoint folder: its layout (the tag folder, `latest`, the EMA files),
its files hashed as DeepSpeed writes them (an optimizer-state file with a "weights" part), the trust boundary around
DeepSpeed's own reads, the conversion to a universal checkpoint, and the weights reader (`open_weights`, no process
group). `import deepspeed` happens only here and in parallel/deepspeed.py, inside functions (`import_deepspeed`).

DeepSpeed unpickles its files with `weights_only=False`, so before it reads any, every file is checked against
bigtrain/core/safe_load.py's policy (`refuse_unsafe_files`), and DeepSpeed's own reads are forced through the same
weights-only unpickler (`_deepspeed_reads`). Resuming on another world size goes through DeepSpeed's universal
checkpoint (`ds_to_universal`, written next to the checkpoint and removed afterwards): rank 0 converts inside
on_main, the other ranks wait in short polls, not in one collective; a copy a crashed start left is removed at the
next. Rank 0 writes DeepSpeed's `latest` file (naming the tag) in save_state, before bigtrain's manifest, which covers
it (DeepSpeed's save_latest would write it after, under a decoupled checkpoint engine), so DeepSpeed's own tools read
a checkpoint folder as its docs show.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigtrain.core import filehash, safe_load
from bigtrain.core.errors import UserError
from bigtrain.parallel.dist import Dist, broadcast_object, on_main

if TYPE_CHECKING:
    from bigtrain.parallel.ema import EMA

TAG = "deepspeed"  # the one DeepSpeed tag folder inside a bigtrain checkpoint folder
LAYOUT = "deepspeed.json"  # ZeRO stage and world size that wrote it: another layout loads via universal
LATEST = "latest"  # DeepSpeed's pointer to the tag: its own tools (zero_to_fp32.py, ...) then need no `-t deepspeed`
UNIVERSAL_PREFIX = ".universal-"  # the converted copy of a checkpoint beside it, while another layout loads it
EMA_RANK_FILE = "ema-rank-{rank:05d}.pt"  # optim.ema_decay: a rank's EMA partitions (ZeRO-1/2: rank 0's, whole)
EMA_LAYOUT = "ema-layout.json"  # how many EMA files, and each tensor's full shape
_WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's name prefix (state_dict keys drop it)


def import_deepspeed():
    """The deepspeed module, or a one-line error saying how to install it (it is an extra)."""
    try:
        import deepspeed
    except ImportError:
        raise UserError("parallel.strategy=deepspeed needs DeepSpeed, which is not installed — "
                        "pip install 'bigtrain[deepspeed]'") from None
    _import_muon_uncompiled()
    return deepspeed


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its torch.compile decorators left off. deepspeed.initialize
    and every ZeRO optimizer import it (to ask whether the optimizer is Muon, which bigtrain's never is), and its
    decorators make torch.compile load Inductor: ~2.5 s of every DeepSpeed process's start, for kernels a bigtrain
    run never calls. Only that module is imported this way; a DeepSpeed without it is left as it is."""
    import sys

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    compile_ = compiler.compile
    compiler.compile = lambda *args, **kwargs: (lambda fn: fn)
    try:
        __import__(name)
    except ImportError:
        pass
    finally:
        compiler.compile = compile_


@contextlib.contextmanager
def _hashing_saves(checkpoint_engine):
    """DeepSpeed's own torch.save checkpoint engine (zip format) saving through bigtrain/core/filehash.py, so each
    rank's files are hashed as they are written, an optimizer-state file with a "weights" part too (`_weights_part`:
    init_from verifies its fp32 master weights without reading the Adam moments beside them); another checkpoint
    engine is left as it is (its files are hashed after the write, whole)."""
    plain = type(checkpoint_engine).__name__ == "TorchCheckpointEngine" and getattr(
        checkpoint_engine, "zipfile_serialization", False)
    if not plain:
        yield
        return

    def save(state_dict, path: str) -> None:  # DeepSpeed passes both by keyword
        filehash.save(state_dict, path)
        weights = _weights_part(state_dict)
        if weights is not None:
            filehash.record_part(path, filehash.WEIGHTS_PART, weights)

    checkpoint_engine.save = save
    try:
        yield
    finally:
        del checkpoint_engine.save  # the class's own again


def _remove_stale_conversions(checkpoints: Path, older_than: float) -> None:
    """Remove the universal copies an earlier start left in a checkpoints folder (it crashed, or was killed, while
    converting or loading): those made before this job's engine was built (`older_than`, a time.time())."""
    for stale in checkpoints.glob(f"{UNIVERSAL_PREFIX}*"):
        with contextlib.suppress(OSError):  # gone already
            if stale.stat().st_mtime < older_than:
                shutil.rmtree(stale, ignore_errors=True)


def _to_universal(tag_folder: Path, output: Path) -> None:
    """DeepSpeed's ds_to_universal: per-parameter fp32 weights and optimizer moments, loadable on any world size."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_folder), output_folder=str(output), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(sys.stderr):
        ds_to_universal.main(args)


def resumable_layout(folder: Path, zero_stage: int) -> tuple[dict, dict]:
    """(trainer.json, the DeepSpeed layout file) of checkpoint `folder`, which a DeepSpeed engine at ZeRO stage
    `zero_stage` can resume (its files checked first); else a one-line error saying what to do instead."""
    refuse_unsafe_files(folder)
    trainer = folder / "trainer.json"
    saved = safe_load.read_json(trainer) if trainer.is_file() else {}
    if saved.get("format", "deepspeed") != "deepspeed" or not (folder / TAG).is_dir():
        raise UserError(f"checkpoint {folder} was written by another strategy (format "
                        f"'{saved.get('format', 'local')}'); resume it with that strategy, or start from its "
                        f"weights with model.init_from")
    layout = safe_load.read_json(folder / LAYOUT) if (folder / LAYOUT).is_file() else {}
    stages = {layout.get("zero_stage", zero_stage), zero_stage}
    if len(stages) > 1 and 3 in stages:  # DeepSpeed's universal checkpoint does not cross ZeRO-3's layout
        raise UserError(f"checkpoint {folder} was written with parallel.zero_stage={layout['zero_stage']}, which "
                        f"does not resume under parallel.zero_stage={zero_stage} — resume with "
                        f"zero_stage={layout['zero_stage']} (on any number of processes), or start from its "
                        f"weights with model.init_from")
    return saved, layout


def universal_copy(folder: Path, dist: Dist, zero_stage: int) -> Path:
    """Checkpoint `folder` converted to DeepSpeed's universal checkpoint (collective), to load on another world size or
    ZeRO stage: one conversion on rank 0, next to the checkpoint (visible to every node); the caller removes it after.
    It may take hours for a large model: the other ranks wait in on_main's short polls, not in one collective."""
    def convert() -> str:
        universal = Path(tempfile.mkdtemp(prefix=f"{UNIVERSAL_PREFIX}{folder.name}-", dir=folder.parent))
        try:
            with _deepspeed_reads(folder):
                _to_universal(folder / TAG, universal / TAG)
        except Exception as e:  # one line on every rank (on_main), nothing half-written left
            shutil.rmtree(universal, ignore_errors=True)
            raise UserError(f"checkpoint {folder}: converting it for {dist.world_size} processes / ZeRO "
                            f"stage {zero_stage} failed: {type(e).__name__}: {e}") from None
        return str(universal)

    path = on_main(dist, convert, what=f"the conversion of {folder} to a universal checkpoint")
    return Path(broadcast_object(dist, path))  # rank 0's result, once it is done


def load_ema_partition(folder: Path, ema: EMA, stage3: bool, dist: Dist) -> None:
    """This rank's EMA from checkpoint `folder`'s EMA files (any number of them: each tensor reassembled whole, then
    this rank's partition taken under ZeRO-3)."""
    reader = DeepSpeedEMAWeights(folder)
    state = {}
    for name, average in ema.averages.items():
        full = reader.get(name).reshape(-1)
        if stage3:
            share = average.numel()
            padded = torch.zeros(share * dist.world_size, dtype=full.dtype)
            padded[:full.numel()] = full
            full = padded[dist.rank * share:(dist.rank + 1) * share]
        state[name] = full.reshape(average.shape)
    ema.load_state_dict(state)


# --------------------------------------------------------------------------- trust boundary


def refuse_unsafe_files(folder: Path) -> None:
    """UserError naming the file unless every .pt file under folder/deepspeed passes bigtrain/core/safe_load.py's policy
    for DeepSpeed files (tensors, plain data, DeepSpeed's plain-data classes). Memory-mapped: only the pickles are
    read. DeepSpeed's own reads afterwards go through `_deepspeed_reads`: the same policy, so a file changed
    between this check and DeepSpeed's read is refused too."""
    allowed = safe_load.deepspeed_classes()
    for path in sorted((Path(folder) / TAG).rglob("*.pt")):
        safe_load.torch_file(path, where=f"DeepSpeed checkpoint file {path}", allowed=allowed, mmap=True)


@contextlib.contextmanager
def _deepspeed_reads(folder: Path):
    """Around DeepSpeed's own reads of a checkpoint (load_checkpoint, zero_to_fp32, ds_to_universal), which call
    torch.load with weights_only=False: every load is weights-only with DeepSpeed's plain-data classes admitted."""
    try:
        with safe_load.weights_only_loads(safe_load.deepspeed_classes()):
            yield
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing DeepSpeed checkpoint {folder}: a file holds more than tensors and plain data "
                        f"({str(e).splitlines()[0][:160]})") from None


# --------------------------------------------------------------------------- weights reader


class DeepSpeedWeights:
    """The consolidated fp32 model weights of a DeepSpeed checkpoint (no process group needed).

    DeepSpeed's zero_to_fp32 in lazy mode: metadata and mmapped shards first; a tensor is gathered
    from the ranks' partitions when asked for."""

    def __init__(self, folder: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not (folder / TAG).is_dir():
            raise UserError(f"checkpoint {folder}: no DeepSpeed folder '{TAG}' (incomplete checkpoint?)")
        import_deepspeed()
        refuse_unsafe_files(folder)
        with contextlib.redirect_stdout(sys.stderr), _deepspeed_reads(folder):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG, lazy_mode=True)
        self._state = {name.replace(_WRAPPED, ""): t for name, t in state.items()}

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._state.items()}

    def get(self, name: str) -> torch.Tensor:
        tensor = self._state[name]
        return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()


class DeepSpeedEMAWeights:
    """The EMA weights of a DeepSpeed checkpoint (`_save_ema`'s files): each tensor its files' parts joined, cut
    to its numel, in its shape; the files memory-mapped."""

    def __init__(self, folder: Path):
        if not (folder / EMA_LAYOUT).is_file():
            raise UserError(f"checkpoint {folder} has no EMA weights — train with optim.ema_decay to keep them")
        layout = safe_load.read_json(folder / EMA_LAYOUT)
        self.shapes = {name: tuple(shape) for name, shape in layout["shapes"].items()}
        self._files = [safe_load.torch_file(folder / EMA_RANK_FILE.format(rank=r), mmap=True)
                       for r in range(layout["files"])]

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (torch.float32, shape) for name, shape in self.shapes.items()}

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return torch.cat([f[name].reshape(-1) for f in self._files])[:math.prod(shape)].reshape(shape).clone()


_HASH_PIECE_BYTES = 1 << 26  # a GPU partition is hashed in 64 MB host copies, not one copy of the whole


def _weights_part(state) -> str | None:
    """The "weights" part of a ZeRO optimizer-state file holding `state` (as saved, or memory-mapped back): sha256
    over what DeepSpeedWeights (zero_to_fp32) reads of it — the ZeRO stage, partition count and alignment paddings,
    then each fp32 master partition's dtype, shape and bytes — and not the Adam moments beside them. None for any
    other file."""
    from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_ALIGNMENT_PADDINGS,
                                                PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)

    zero = state.get(OPTIMIZER_STATE_DICT) if isinstance(state, dict) else None
    if not isinstance(zero, dict) or ZERO_STAGE not in zero:
        return None
    stage = int(zero[ZERO_STAGE])
    partitions = zero.get(FP32_FLAT_GROUPS if stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS)
    if not isinstance(partitions, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in partitions):
        return None
    plain = [stage, zero.get(PARTITION_COUNT), zero.get(PARAM_ALIGNMENT_PADDINGS)]
    digest = hashlib.sha256(json.dumps(plain, default=int).encode())
    for tensor in partitions:
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        # in place on the CPU (memory-mapped: only these pages are read); off it, in pieces
        for start in range(0, flat.numel(), _HASH_PIECE_BYTES):
            digest.update(flat[start:start + _HASH_PIECE_BYTES].cpu().numpy())
    return digest.hexdigest()


def weights_digests(folder: Path, names: list[str]) -> dict[str, str | None]:
    """The "weights" part of each ZeRO optimizer-state file `names` of checkpoint `folder`, computed from the file
    (memory-mapped: the pickle and the fp32 partitions are read, not the moments); None for a file that no longer
    reads as one."""
    import_deepspeed()
    allowed = safe_load.deepspeed_classes()
    digests = {}
    for name in names:
        try:
            state = safe_load.torch_file(folder / name, where=f"DeepSpeed checkpoint file {folder / name}",
                                         allowed=allowed, mmap=True)
        except safe_load.UnsafeFile:  # damaged (or changed) since the manifest was written
            state = None
        digests[name] = _weights_part(state)
    return digests


def holds_weights(name: str) -> bool:
    """DeepSpeedWeights reads every file of the tag folder: the fp32 master weights are in the optimizer state
    files (beside the Adam moments), the shapes in the model state files."""
    return name.startswith(f"{TAG}/")


def open_weights(folder: Path, ema: bool = False):
    return DeepSpeedEMAWeights(Path(folder)) if ema else DeepSpeedWeights(Path(folder))
