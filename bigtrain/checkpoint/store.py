"""Run-dir checkpoints: layout, atomic save, discovery and retention (manifest.py verifies them, resume.py picks
and loads one, weights.py reads weights out of one).

Layout: <run dir>/checkpoints/step-NNNNNNN/ holding the engine's tensor files, trainer.json
(step, samples consumed, skipped steps, wandb run id, scheduler), config.yaml (resolved recipe),
rng/rank-NNNNN.pt, and manifest.json. Everything is written into a hidden temp folder first; the
manifest (size + sha256 of every file) is written last and the folder is renamed into place, so a
`step-*` folder is complete by construction and a damaged one is caught by its checksums.
Tensors go through the engine (`save_state` / `load_state`) so each strategy owns its format.
A LoRA run started from `model.init_from` saves only what it changes (adapters, a new head, optimizer, trainer
state): the frozen base tensors stay in the base, which base.json names (its folder, a sha256 of its weights and
which of its tensors the model holds). A resume checks the base is the same; readers (`open_weights`: export,
eval, init_from: weights.py) put the base's tensors back under the checkpoint's own (`with_base`).
`checkpoint.async_save` (the `Checkpointer`): the training thread only copies the state to host memory;
writing, fsync, checksums, the manifest, the rename and pruning happen on a background thread, and the
next save or the process's exit waits for them. A preemption's save is synchronous.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bigtrain.checkpoint.manifest import MANIFEST, CheckpointError, _fsync_written, hash_files, verify
from bigtrain.core import filehash
from bigtrain.core.errors import UserError, say
from bigtrain.core.fsio import fsync_dir as _fsync_dir
from bigtrain.core.fsio import write_atomic as _write_atomic
from bigtrain.parallel import Dist, barrier
from bigtrain.parallel.dist import all_gather_object, new_background_group

TRAINER = "trainer.json"
BASE_FILE = "base.json"  # a LoRA run's checkpoints: the base whose frozen tensors they leave out


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (resume is O(1): no data replay)."""

    step: int = 0
    samples_consumed: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    wandb_run_id: str | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:07d}"


# --------------------------------------------------------------------------- save


def save(run_dir: Path, state: TrainState, engine, dist: Dist, *, config_yaml: str, keep_last: int,
         extra_files: dict[str, Path] | None = None, verified: VerifiedCheckpoints | None = None,
         lease=None) -> Path:
    """Write a complete checkpoint of `state` (collective: every rank calls it; synchronous).

    extra_files: name → file copied in (the tokenizer, the label set), so a checkpoint stands alone.
    verified: what retention knows of the run dir's checkpoints (the run's; None: a new record).
    lease: rank 0's RunDirLease (bigtrain/checkpoint/lease.py); checked before anything is written and before publishing.
    """
    tmp, final = _start(run_dir, state.step, dist, lease)
    engine.save_state(tmp)
    _write_trainer_files(tmp, state, engine, dist, _rng_state(dist), config_yaml, extra_files)
    _publish(tmp, final, state, dist, keep_last, verified=verified or VerifiedCheckpoints(), lease=lease)
    return final


class Checkpointer:
    """The run's saves. With `async_save` (and an engine that has `save_state_async`: single, ddp, fsdp) a save
    copies the state to host memory and returns; a background thread writes, fsyncs, checksums and publishes it,
    its collectives on a gloo group of its own. At most one save is in flight: the next save, `wait()` and
    `close()` wait for it, so a checkpoint is durable before the next one starts and before the process exits.
    `history` records, per save, the seconds the training thread spent in it and until it was durable (bench)."""

    def __init__(self, run_dir: Path, engine, dist: Dist, *, config_yaml: str, keep_last: int,
                 extra_files: dict[str, Path] | None = None, async_save: bool = True,
                 verified: VerifiedCheckpoints | None = None, lease=None):
        self.run_dir, self.engine, self.dist, self.lease = Path(run_dir), engine, dist, lease
        self.config_yaml, self.keep_last, self.extra_files = config_yaml, keep_last, extra_files
        self.verified = verified or VerifiedCheckpoints()  # retention's record: each checkpoint read at most once
        self.async_save = async_save and hasattr(engine, "save_state_async")
        self.history: list[dict] = []
        self._group = None  # the background group, made at the first async save (every rank is there)
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    def save(self, state: TrainState, sync: bool = False) -> Path:
        """Checkpoint `state` (collective). `sync` (preemption): written, published and durable on return."""
        t0 = time.perf_counter()
        self.wait()
        final = step_dir(self.run_dir, state.step)
        record: dict[str, int | bool | float] = {"step": state.step, "async": self.async_save and not sync}
        if not record["async"]:
            save(self.run_dir, state, self.engine, self.dist, config_yaml=self.config_yaml, keep_last=self.keep_last,
                 extra_files=self.extra_files, verified=self.verified, lease=self.lease)
            record["stall_s"] = record["durable_s"] = time.perf_counter() - t0
            self.history.append(record)
            return final
        if self._executor is None:
            self._group = new_background_group()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigtrain-checkpoint")
        tmp, _ = _start(self.run_dir, state.step, self.dist, self.lease)
        state = replace(state)  # the loop goes on changing its own
        rng = _rng_state(self.dist)
        written = self.engine.save_state_async(tmp, self._group)  # host copy now; this rank's files later

        def finish() -> None:
            error = None
            try:
                written.result()
                _write_trainer_files(tmp, state, self.engine, self.dist, rng, self.config_yaml, self.extra_files)
            except Exception as e:  # noqa: BLE001 — every rank learns of it below; none waits in _publish
                error = e
            failed = [f for f in all_gather_object(self.dist, error and f"rank {self.dist.rank}: {error}", self._group) if f]
            if error is not None:
                raise error
            if failed:
                raise RuntimeError(f"checkpoint {final.name} not saved: {failed[0]}")
            _publish(tmp, final, state, self.dist, self.keep_last, self._group, verified=self.verified,
                     lease=self.lease)
            record["durable_s"] = time.perf_counter() - t0

        self._pending = self._executor.submit(finish)
        record["stall_s"] = time.perf_counter() - t0
        self.history.append(record)
        return final

    def wait(self) -> None:
        """Block until the save in flight (if any) is durable; raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Before any exit: wait for the save in flight; report (not raise) its failure, as an error is on its way."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 — the exit already under way says what went wrong first
            print(f"bigtrain: warning: rank {self.dist.rank}: the checkpoint save in flight failed: {e}", file=sys.stderr)
        if self._executor is not None:
            self._executor.shutdown()


def _start(run_dir: Path, step: int, dist: Dist, lease=None) -> tuple[Path, Path]:
    """(temp folder, final folder) of a save of `step`: the temp folder emptied and made, seen by every rank."""
    _stop_unless_owner(lease, dist)
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier(dist)
    return tmp, final


def _write_trainer_files(tmp: Path, state: TrainState, engine, dist: Dist, rng: dict, config_yaml: str,
                         extra_files: dict[str, Path] | None) -> None:
    filehash.save(rng, tmp / "rng" / f"rank-{dist.rank:05d}.pt")
    if dist.is_main:
        (tmp / TRAINER).write_text(json.dumps({**asdict(state), "world_size": dist.world_size,
                                               "format": engine.checkpoint_format,
                                               "scheduler": {"step": state.step}}, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)


def _publish(tmp: Path, final: Path, state: TrainState, dist: Dist, keep_last: int, group=None, *,
             verified: VerifiedCheckpoints, lease=None) -> None:
    """fsync, checksum (each rank its share), manifest last, rename into place, then prune (collective over `group`)."""
    _fsync_written(tmp, dist, group)  # every rank its own files, on disk before rank 0 publishes the folder
    barrier(dist, group)
    files = hash_files(tmp, dist, group)  # every rank hashes its share of the files
    _stop_unless_owner(lease, dist, group)  # the run dir may have changed hands while the files were written
    if dist.is_main:
        manifest = {"step": state.step, "samples_consumed": state.samples_consumed, "files": files}
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))  # fsynced; its folder entry next
        _fsync_dir(tmp)
        # Re-saving the same step (e.g. a finished run resumed): the complete one steps aside, and is
        # deleted only once its replacement is in place (list_checkpoints lists it meanwhile).
        old = final.with_name(f".old-{final.name}")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        verified.mark_good(final)  # its files were checksummed as they were written: not read back
    prune(final.parent.parent, keep_last, verified, dist, group)  # only now: the new checkpoint is durable
    barrier(dist, group)


def _stop_unless_owner(lease, dist: Dist, group=None) -> None:
    """Every rank raises rank 0's one line when the run dir's lease (held by rank 0) is no longer this job's:
    another job took the run dir over, and this one must neither write nor delete checkpoints there."""
    problem = all_gather_object(dist, lease.problem() if lease is not None else None, group)[0]
    if problem:
        raise UserError(problem)


def prune(run_dir: Path, keep_last: int, verified: VerifiedCheckpoints | None = None, dist: Dist | None = None,
          group=None) -> None:
    """Delete the good checkpoints older than the newest `keep_last` good ones (0 keeps all). Only a checkpoint
    that verifies counts, so a damaged one never pushes out the good one a resume would need; a damaged one is
    not deleted either (it stays for the user to look at, named in one warning per process). `verified` keeps
    each checkpoint's verdict for the process, so a save reads at most the checkpoints it has not seen yet.
    With `dist` it is collective: rank 0 decides, and the ranks verify what it has not seen together, each its
    share of the files (no rank waits in a collective while another reads a whole checkpoint alone)."""
    if keep_last <= 0:
        return
    verified = verified or VerifiedCheckpoints()
    main = dist is None or dist.is_main
    folders = list(reversed(list_checkpoints(run_dir))) if main else []
    unseen = [f for f in folders if not verified.knows(f)]
    for folder in (unseen if dist is None else all_gather_object(dist, unseen, group)[0]):
        verified.learn(folder, dist, group)
    if not main:
        return
    good = 0
    for folder in folders:
        if verified.problem(folder) is None:
            good += 1
            if good > keep_last:
                shutil.rmtree(folder, ignore_errors=True)


class VerifiedCheckpoints:
    """Which checkpoints retention knows to be good or damaged in this process, so each is read whole at most
    once: one this process published is good by construction (its checksums were taken as it was written), an
    older one is verified the first time it is looked at. A verdict is keyed by the folder and its manifest's
    identity (inode, size, mtime), so a checkpoint re-saved under the same name is looked at afresh."""

    def __init__(self, warn=None):
        self._verdicts: dict[tuple, str | None] = {}
        self._warn = warn or say

    def mark_good(self, folder: Path) -> None:
        self._verdicts[self._key(folder)] = None

    def knows(self, folder: Path) -> bool:
        return self._key(folder) in self._verdicts

    def learn(self, folder: Path, dist: Dist | None = None, group=None) -> None:
        """Verify `folder` (collective with `dist`: each rank its share) and keep the verdict; rank 0 warns of
        a damaged one."""
        try:
            verify(folder, dist, group)
            verdict = None
        except CheckpointError as e:
            verdict = str(e)
            if dist is None or dist.is_main:
                self._warn(f"bigtrain: warning: {e} — this checkpoint is kept, and not counted toward "
                           f"checkpoint.keep_last; delete it once you have looked at it")
        self._verdicts[self._key(folder)] = verdict

    def problem(self, folder: Path) -> str | None:
        """None for a complete checkpoint, else what is wrong with it (verified now if not seen yet)."""
        if not self.knows(folder):
            self.learn(folder)
        return self._verdicts[self._key(folder)]

    @staticmethod
    def _key(folder: Path) -> tuple:
        where = str(Path(folder).absolute())
        try:
            stat = (Path(folder) / MANIFEST).stat()
        except FileNotFoundError:
            return where, None  # incomplete: verify says so, once
        return where, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _rng_state(dist: Dist) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if dist.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    return state


# --------------------------------------------------------------------------- discovery


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step folders, oldest first (temp folders of interrupted saves are never listed; a step folder a
    re-save of its step set aside, `.old-step-N`, is listed while `step-N` is missing)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and _step_of(p.name) is not None}
    steps = [p for name, p in folders.items() if name.startswith("step-")]
    steps += [p for name, p in folders.items() if name.startswith(".old-step-") and name[5:] not in folders]
    # by number: step-10000000 comes after step-9999999 (`or 0` for the type only: every name listed has a step)
    return sorted(steps, key=lambda p: _step_of(p.name) or 0)


def _step_of(name: str) -> int | None:
    """The step of a `step-N` (or `.old-step-N`) folder name; None for any other name."""
    digits = name.removeprefix(".old-").removeprefix("step-")
    return int(digits) if digits != name.removeprefix(".old-") and digits.isdigit() else None
