"""Which checkpoint a run resumes from (`checkpoint.resume`: auto, none or a path; damaged ones named and skipped)
and loading it: the engine's state, the trainer state, the rng streams, a LoRA run's base checked."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from bigtrain.checkpoint.manifest import MANIFEST, CheckpointError, verify
from bigtrain.checkpoint.store import (BASE_FILE, TRAINER, TrainState, VerifiedCheckpoints, checkpoints_dir,
                                       list_checkpoints)
from bigtrain.checkpoint.weights import check_base
from bigtrain.core import safe_load
from bigtrain.parallel import Dist

def _restore_rng(folder: Path, dist: Dist, saved_world_size: int) -> None:
    path = folder / "rng" / f"rank-{dist.rank:05d}.pt"
    if saved_world_size != dist.world_size or not path.exists():
        return  # a different world size: per-rank streams don't map over; keep the seeded ones
    state = safe_load.torch_file(path)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and dist.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dist.device)


def find_resume_checkpoint(resume: str, run_dir: Path, warn=print, dist: Dist | None = None) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start.

    auto: the newest complete checkpoint of the run dir, skipping (and naming) damaged ones.
    A path: a checkpoint folder, or a run dir (its newest complete checkpoint); damage is an error.
    With `dist` it is collective (every rank verifies its share of the files; rank 0 warns).
    """
    if resume == "none":
        return None
    if resume == "auto":
        damaged = []
        for folder in reversed(list_checkpoints(run_dir)):
            try:
                verify(folder, dist)
                return folder
            except CheckpointError as e:
                damaged.append(folder.name)
                if dist is None or dist.is_main:
                    warn(f"warning: {e} — falling back to an earlier checkpoint")
        if damaged:  # a fresh start here would silently throw the run away
            raise CheckpointError(f"no complete checkpoint in {checkpoints_dir(run_dir)}: every one is damaged "
                                  f"({', '.join(damaged)}; named above)")
        return None
    path = Path(resume).expanduser()
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        verify(path, dist)
        return path
    candidates = list_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"checkpoint.resume: no checkpoint in '{path}'")
    verify(candidates[-1], dist)
    return candidates[-1]


def resume(resume_setting: str, run_dir: Path, engine, dist: Dist, warn=print, base: dict | None = None,
           verified: VerifiedCheckpoints | None = None) -> TrainState:
    """Load engine state + trainer state from the chosen checkpoint (collective; the ranks verify it together).
    `base`: the base_reference of the model this run built (a LoRA run's init_from), which a checkpoint holding
    only adapters must have been trained on. `verified` (the run's Checkpointer's) learns the checkpoint is good."""
    try:
        folder = find_resume_checkpoint(resume_setting, run_dir, warn, dist)
    except CheckpointError as e:
        if resume_setting != "auto":
            raise
        raise CheckpointError(f"{e} — to train from step 0 instead, set checkpoint.resume=none (the damaged "
                              f"checkpoints stay where they are)") from None
    if folder is None:
        return TrainState()
    if verified is not None:
        verified.mark_good(folder)
    if (folder / BASE_FILE).is_file():
        if base is None:
            saved = safe_load.read_json(folder / BASE_FILE)
            raise CheckpointError(f"checkpoint {folder} holds LoRA adapters trained on {saved['init_from']}, but this "
                                  f"run has no model.lora base — resume with the base it was trained on")
        check_base(folder, current=base)
    try:
        engine.load_state(folder)
        saved = safe_load.read_json(folder / TRAINER)
    except BaseException as e:  # noqa: BLE001 — DCP wraps a rank's failure in a BaseException of its own
        missing = _missing_file(e)
        if missing is None:
            raise
        raise CheckpointError(f"checkpoint {folder}: {missing} is missing (it verified a moment ago: is another "
                              f"job pruning this run dir?) — start again: resume: auto takes the newest checkpoint "
                              f"that is complete") from None
    _restore_rng(folder, dist, saved.get("world_size", 1))
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in saved.items() if k in fields})


def _missing_file(error: BaseException) -> str | None:
    """The file a load failed to find, from `error`, its causes, or the per-rank failures DCP collects."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FileNotFoundError):
            return str(e.filename or e)
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None
