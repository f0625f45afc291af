"""Run-dir checkpoints: layout, atomic save, discovery, verification, retention and resume.

Layout: <run dir>/checkpoints/step-NNNNNNN/ holding the engine's tensor files, trainer.json
(step, samples consumed, skipped steps, wandb run id, scheduler), config.yaml (resolved recipe),
rng/rank-NNNNN.pt, and manifest.json. Everything is written into a hidden temp folder first; the
manifest (size + sha256 of every file) is written last and the folder is renamed into place, so a
`step-*` folder is complete by construction and a damaged one is caught by its checksums.
Tensors go through the engine (`save_state` / `load_state`) so each strategy owns its format.
A LoRA run started from `model.init_from` saves only what it changes (adapters, a new head, optimizer, trainer
state): the frozen base tensors stay in the base, which base.json names (its folder, a sha256 of its weights and
which of its tensors the model holds). A resume checks the base is the same; readers (`open_weights`: export,
eval, init_from) put the base's tensors back under the checkpoint's own (`with_base`).
`checkpoint.async_save` (the `Checkpointer`): the training thread only copies the state to host memory;
writing, fsync, checksums, the manifest, the rename and pruning happen on a background thread, and the
next save or the process's exit waits for them. A preemption's save is synchronous.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bigtrain.core import filehash

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError, say
from bigtrain.core.fsio import fsync_dir as _fsync_dir
from bigtrain.core.fsio import fsync_file
from bigtrain.core.fsio import write_atomic as _write_atomic
from bigtrain.parallel import Dist, barrier, open_format_weights, weights_digests
from bigtrain.parallel.dist import all_gather_object, new_background_group

MANIFEST = "manifest.json"
TRAINER = "trainer.json"
BASE_FILE = "base.json"  # a LoRA run's checkpoints: the base whose frozen tensors they leave out


class CheckpointError(UserError):
    """A checkpoint is missing, truncated or corrupted; the message names the file."""


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
        record = {"step": state.step, "async": self.async_save and not sync}
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


# Files one rank of the saving job wrote and the same rank of a job of that size loads: DCP's shard (`__R_0.distcp`),
# ZeRO's partitions (`zero_pp_rank_R_…`), the rank's rng and EMA files; and the single/ddp state rank 0 alone reads
# and broadcasts (parallel/local.py `load_on_main`).
_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|zero_pp_rank_(\d+)_[^/]*|rng/rank-(\d+)\.pt|ema-rank-(\d+)\.pt)$")
_MAIN_FILES = {"model.pt", "optimizer.pt", "ema.pt"}


def _shares(names: list[tuple[str, int]], world_size: int) -> list[list[str]]:
    """Split files among ranks, each read once: a rank's own file (`_RANK_FILE`, when that rank exists here; single/ddp
    state to rank 0) to that rank, so verifying it reads what the rank loads next anyway; the rest largest first to
    the least loaded rank."""
    shares, loads, rest = [[] for _ in range(world_size)], [0] * world_size, []
    for name, size in names:
        match = _RANK_FILE.search(name)
        owner = int(next(g for g in match.groups() if g is not None)) if match else 0 if name in _MAIN_FILES else None
        if owner is not None and owner < world_size:
            shares[owner].append(name)
            loads[owner] += size
        else:
            rest.append((name, size))
    for name, size in sorted(rest, key=lambda item: -item[1]):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += size
    return shares


def hash_files(folder: Path, dist: Dist, group=None) -> dict[str, dict]:
    """{relative name: {bytes, sha256}} of every file under `folder` (collective). A file whose digest was taken
    as it was written (bigtrain/core/filehash.py: torch.save files, DCP shards, DeepSpeed's) is not read again;
    the rest the ranks hash in parallel, each its share by size, so that part takes the time of 1/world
    of those bytes."""
    names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
    entries = {}
    for part in all_gather_object(dist, {n: e for n in names if (e := filehash.known(folder / n))}, group):
        entries.update(part)
    rest = [(n, (folder / n).stat().st_size) for n in names if n not in entries]
    mine = _shares(rest, dist.world_size)[dist.rank]
    for part in all_gather_object(dist, {name: filehash.file_entry(folder / name) for name in mine}, group):
        entries.update(part)
    filehash.forget(folder)
    return dict(sorted(entries.items()))


def _fsync_written(folder: Path, dist: Dist, group=None) -> None:
    """fsync each file under `folder` once, by the rank that wrote it (collective over `group`), so a rename after
    it publishes data that is on disk: each rank the files it recorded as it wrote them (bigtrain/core/filehash.py:
    torch.save files, DCP shards, DeepSpeed's); rank 0 the files no rank recorded (it writes them itself:
    trainer.json, config.yaml, the tokenizer, layout files) and every folder. Not every rank every file: on a
    shared filesystem that is world size × the checkpoint's files opened, and another client's fsync would not
    flush the writer's cache anyway."""
    mine = filehash.written(folder)
    recorded = {path for part in all_gather_object(dist, mine, group) for path in part}
    if dist.is_main:
        unrecorded = (os.path.abspath(p) for p in sorted(folder.rglob("*")) if p.is_file())
        mine += [path for path in unrecorded if path not in recorded]
    for path in mine:
        fsync_file(path)
    if dist.is_main:
        for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            _fsync_dir(path)


def _rng_state(dist: Dist) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if dist.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dist.device)
    return state


def _restore_rng(folder: Path, dist: Dist, saved_world_size: int) -> None:
    path = folder / "rng" / f"rank-{dist.rank:05d}.pt"
    if saved_world_size != dist.world_size or not path.exists():
        return  # a different world size: per-rank streams don't map over; keep the seeded ones
    state = safe_load.torch_file(path)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and dist.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dist.device)


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
    return sorted(steps, key=lambda p: _step_of(p.name))  # by number: step-10000000 comes after step-9999999


def _step_of(name: str) -> int | None:
    """The step of a `step-N` (or `.old-step-N`) folder name; None for any other name."""
    digits = name.removeprefix(".old-").removeprefix("step-")
    return int(digits) if digits != name.removeprefix(".old-") and digits.isdigit() else None


def verify(folder: Path, dist: Dist | None = None, group=None, only=None, weights_parts: bool = False) -> dict:
    """Check the manifest and every file's size and sha256; return the manifest or raise CheckpointError.
    With `dist` it is collective (over `group`): the ranks check the files in parallel, each its share (by
    size), and every rank raises the same error. `only(name) -> bool`: check just those files (init_from: what it
    reads). `weights_parts` (init_from, which reads only the model weights): a file whose manifest entry has a
    "weights" part (the model weights of a shard that holds optimizer state beside them) is checked by that part
    alone, and after the other files (its format finds its weights through them, e.g. DCP's .metadata)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"incomplete checkpoint {folder}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
        parts = {str(name): str(entry["parts"][filehash.WEIGHTS_PART]) for name, entry in manifest["files"].items()
                 if weights_parts and filehash.WEIGHTS_PART in entry.get("parts", {})}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"corrupted checkpoint {folder}: unreadable {MANIFEST}") from None
    files = {name: entry for name, entry in files.items() if only is None or only(name)}
    parts = {name: part for name, part in parts.items() if name in files}
    _raise_first_problem({n: e for n, e in files.items() if n not in parts}, dist, group,
                         lambda mine: {n: p for n in mine if (p := _file_problem(folder, n, *files[n]))})
    if parts:
        _raise_first_problem({n: files[n] for n in parts}, dist, group,
                             lambda mine: _weights_problems(folder, mine, files, parts))
    return manifest


def _raise_first_problem(files: dict[str, tuple[int, str]], dist: Dist | None, group, problems_in) -> None:
    """Check `files` (name -> (bytes, sha256)) with `problems_in(names) -> {name: problem}`, each rank its share with
    `dist` (collective), and raise the first problem in manifest order on every rank."""
    mine = list(files) if dist is None else _shares([(n, size) for n, (size, _) in files.items()], dist.world_size)[dist.rank]
    problems = problems_in(mine)
    if dist is not None:
        problems = {k: v for part in all_gather_object(dist, problems, group) for k, v in part.items()}
    first = next((name for name in files if name in problems), None)
    if first is not None:
        raise CheckpointError(problems[first])


def _file_problem(folder: Path, name: str, size: int, sha256: str | None) -> str | None:
    """What is wrong with file `name` of checkpoint `folder` (missing, another size, another sha256), or None.
    `sha256` None: its size alone is checked (its weights part is, after)."""
    path = safe_load.inside(folder, name, where=folder / MANIFEST)
    if not path.is_file():
        return f"incomplete checkpoint {folder}: missing {name}"
    if path.stat().st_size != size:
        return f"truncated checkpoint file {path}: {path.stat().st_size} bytes, manifest says {size}"
    if sha256 is not None and filehash.sha256(path) != sha256:
        return f"corrupted checkpoint file {path}: sha256 does not match the manifest"
    return None


def _weights_problems(folder: Path, names: list[str], files: dict, parts: dict[str, str]) -> dict[str, str]:
    """The problems of files `names` checked by their weights part: the size, then the part's digest, which the
    format that wrote them computes reading only the weights (`parallel.weights_digests`)."""
    problems = {n: p for n in names if (p := _file_problem(folder, n, files[n][0], None))}
    rest = [n for n in names if n not in problems]
    try:
        digests = weights_digests(folder, rest)
    except UserError as e:  # e.g. a crafted .metadata refused: a problem every rank then raises, none left waiting
        return {**problems, **{n: str(e) for n in rest}}
    problems.update({n: f"corrupted checkpoint file {folder / n}: sha256 of its weights does not match the manifest"
                     for n, digest in digests.items() if digest != parts[n]})
    return problems


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
    seen, todo = set(), [error]
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


# --------------------------------------------------------------------------- init_from


def resolve_init_checkpoint(path: str, revision: str | None = None, *, key: str = "model.init_from") -> Path:
    """model.init_from → a checkpoint folder (a run dir means its newest checkpoint), or a Hugging Face model folder
    (config.json + weights; a hub id's snapshot; see bigtrain/interop). `key`: the recipe key errors name (task.teacher
    reads a folder the same way). It only lists folders: a start resolves each once, before its process group
    exists, and `verify_init_checkpoint` then checks the files it reads, each rank its share."""
    from bigtrain.interop.hf_config import is_hf_folder, looks_like_hf_folder, read_config
    from bigtrain.interop.hub import local_folder

    where = local_folder(path, revision, where=key)
    if not where.exists():
        raise CheckpointError(f"{key}: no such run dir, checkpoint or Hugging Face folder '{path}'")
    if is_hf_folder(where):
        return where
    if looks_like_hf_folder(where):
        read_config(where, where=key)  # raises: HF weights without a config.json
    if (where / MANIFEST).exists():
        return where
    candidates = list_checkpoints(where)
    if not candidates:
        raise CheckpointError(f"{key}: no complete checkpoint in '{path}'")
    return candidates[-1]


INIT_READS = (TRAINER, "config.yaml", BASE_FILE)  # what init_from reads of a checkpoint besides its weights files


def verify_init_checkpoint(folder: Path, dist: Dist, *, also: tuple[str, ...] = (), key: str = "model.init_from"
                           ) -> None:
    """Check against its manifest what init_from reads of checkpoint `folder` (collective: each rank its share by
    size, as a resume does): the files its format's weights reader opens (`parallel.holds_weights`), INIT_READS and
    `also` (the tokenizer, its side files, the labels). The optimizer state, the rng files and the EMA are never read,
    so never checked: for a 70B model that is most of a checkpoint. A shard that holds optimizer state beside the
    weights (DCP's `__R_0.distcp`, ZeRO's `*_optim_states.pt`) is checked by its manifest's "weights" part when it
    has one (checkpoints saved before parts existed: whole), each rank the shard it wrote, reading just the weights.
    A Hugging Face folder has no manifest."""
    from bigtrain.interop.hf_config import is_hf_folder
    from bigtrain.parallel import holds_weights

    if is_hf_folder(folder):
        return
    small = {*INIT_READS, *also}
    try:
        verify(folder, dist, only=lambda name: name in small or holds_weights(name), weights_parts=True)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e} — point {key} at an intact checkpoint") from None


def load_init_weights(folder: Path, expected: dict[str, tuple[int, ...]], *, arch: str, key: str = "model.init_from"
                      ) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Weights of checkpoint `folder` (any strategy's format, or a Hugging Face folder) that match the
    model's tensors `expected` (name -> shape); weights only: no optimizer, no step. A LoRA run's weights come
    with its adapters merged in (a model with model.lora starts new adapters on them).

    Returns ({"loaded", "new", "unused"} tensor names, {name: tensor} to load, read from the folder only
    when looked up: engines copy one tensor at a time, so no rank holds a second full model). A tensor whose shape
    differs, or a checkpoint of another architecture, is a one-line error naming the tensor; except a
    Hugging Face classifier of another num_labels than the data's: that head is new (and the folder's unused),
    as transformers' from_pretrained(num_labels=..., ignore_mismatched_sizes=True) does.
    """
    from bigtrain.interop.hf_config import is_hf_folder

    reader, saved_arch = open_init_reader(folder, key)
    saved = reader.tensors()  # name -> (dtype, shape): nothing read yet
    if saved_arch != arch:
        foreign = next((k for k in saved if k not in expected), next(iter(saved)))
        raise CheckpointError(f"{key}: {folder} holds a '{saved_arch}' model (e.g. tensor '{foreign}'), "
                              f"but model.arch is '{arch}' — set model.arch: {saved_arch} or pick another checkpoint")
    other_head = {name for name, shape in expected.items() if is_hf_folder(folder) and name.startswith("classifier.")
                  and name in saved and tuple(saved[name][1]) != tuple(shape)}  # another num_labels: a new head
    for name, shape in expected.items():
        if name in saved and name not in other_head and tuple(saved[name][1]) != tuple(shape):
            raise CheckpointError(f"{key}: tensor '{name}' is {tuple(saved[name][1])} in {folder} but "
                                  f"{tuple(shape)} in this model — the model settings must match the checkpoint's")
    # An HF classifier folder has no MLM head; a tied one is the token embedding it holds (encoders are tied).
    tied = [k for k in ("lm_head.weight", "mlm_head.proj.weight") if is_hf_folder(folder) and k in expected
            and k not in saved and "tok_emb.weight" in saved]
    loaded = [k for k in expected if (k in saved and k not in other_head) or k in tied]
    report = {"loaded": loaded, "new": [k for k in expected if k not in loaded],
              "unused": [k for k in saved if k not in loaded]}
    return report, LazyWeights(reader, {k: "tok_emb.weight" if k in tied else k for k in loaded})


def open_init_reader(folder: Path, key: str = "model.init_from"):
    """(WeightsReader under bigtrain's tensor names, arch) of what init_from reads in `folder`: a Hugging Face
    folder's weights, or a checkpoint's (a LoRA run's with its adapters merged into the weights they adapt)."""
    from bigtrain.interop.hf_config import is_hf_folder

    if is_hf_folder(folder):
        from bigtrain.interop.hf_weights import open_hf_weights

        reader = open_hf_weights(folder, where=key)
        return reader, reader.arch
    reader = open_weights(folder)
    saved_model = safe_load.read_yaml(folder / "config.yaml").get("model", {})
    if saved_model.get("lora"):
        from bigtrain.config import LoraConfig
        from bigtrain.models.lora import MergedLoRAWeights

        reader = MergedLoRAWeights(reader, LoraConfig(**saved_model["lora"]).scaling)
    return reader, saved_model.get("arch", "decoder")


def base_reference(folder: Path, tensors: dict[str, str], earlier: dict | None = None) -> dict:
    """base.json of a LoRA run started from `folder`: its path, a sha256 of its weights, and `tensors` (model name →
    the name init_from read it under) that checkpoints leave out. A bigtrain checkpoint is identified by its
    manifest (every file's sha256); a Hugging Face folder by its weights files' digests (a hub snapshot's files
    are blobs named by their sha256; a local folder's are read, and kept in base.json's `files` with their size
    and mtime: `earlier`, the base.json of the run's last start, saves reading them again while those are the
    same — for an 8B model, ~16 GB at each resume)."""
    import hashlib

    from bigtrain.interop.hf_config import is_hf_folder

    folder = Path(folder).absolute()
    known = (earlier or {}).get("files", {}) if (earlier or {}).get("init_from") == str(folder) else {}
    digest, files = hashlib.sha256(), {}
    if is_hf_folder(folder):
        for path in sorted(folder.iterdir()):
            if path.suffix in (".safetensors", ".bin", ".pt") or path.name.endswith(".index.json"):
                blob = path.resolve().name
                if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
                    file_digest = blob
                else:
                    stat, seen = path.stat(), known.get(path.name, {})
                    same = (seen.get("bytes"), seen.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
                    file_digest = seen["sha256"] if same else filehash.sha256(path)
                    files[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_digest}
                digest.update(f"{path.name} {file_digest}\n".encode())
    else:
        digest.update((folder / MANIFEST).read_bytes())
    return {"init_from": str(folder), "sha256": digest.hexdigest(), "tensors": tensors, **({"files": files} if files else {})}


def check_base(folder: Path, current: dict | None = None) -> dict:
    """The base.json of checkpoint `folder` (LoRA adapters saved without their base), once the base it names is
    checked to be the one they were trained on: the same sha256 (`base_reference`). `current`: the base_reference of
    the base a resumed run was built on; else the base at the path base.json names is digested again, a local
    weights file's digest reused only while its size and mtime are the ones base.json recorded with it. Adapters on
    another base compute another model, silently: a missing or changed base is a CheckpointError naming it. Every
    path that opens a base (resume, `with_base`: export, eval, generate, lm-eval, init_from) checks it here."""
    saved = safe_load.read_json(Path(folder) / BASE_FILE)
    trained_on = f"checkpoint {folder} holds LoRA adapters trained on {saved['init_from']} (sha256 {saved['sha256'][:12]})"
    if current is None:
        base_folder = Path(saved["init_from"])
        if not base_folder.exists():
            raise CheckpointError(f"{trained_on}, which is gone — put the base back there")
        try:
            current = base_reference(base_folder, saved["tensors"], earlier=saved)
        except OSError as e:  # e.g. a checkpoint base without its manifest any more
            raise CheckpointError(f"{trained_on}, which cannot be read ({e}) — put the base back there") from None
        if current["sha256"] != saved["sha256"]:
            raise CheckpointError(f"{trained_on}, but that base has changed since (sha256 now {current['sha256'][:12]})"
                                  f" — put back the base the adapters were trained on")
    elif current["sha256"] != saved["sha256"]:
        raise CheckpointError(f"{trained_on}, but model.init_from is now {current['init_from']} (sha256 "
                              f"{current['sha256'][:12]}) — resume with the base it was trained on")
    return saved


def open_weights(folder: Path, ema: bool = False):
    """A reader of the model weights in checkpoint `folder`, whatever strategy wrote it (`ema`: its EMA weights); a
    LoRA run's adapters-only checkpoint (base.json) with its base's tensors read from the base."""
    reader = open_format_weights(folder, ema=ema)
    return with_base(reader, folder) if (Path(folder) / BASE_FILE).is_file() else reader


def with_base(reader, folder: Path):
    """`reader` (a checkpoint's own tensors) with the base tensors its base.json names put back, read from the
    base on lookup (once `check_base` found it unchanged): the whole model, as a checkpoint that held it would give."""
    saved = check_base(folder)
    base, _ = open_init_reader(Path(saved["init_from"]), key=f"{folder / BASE_FILE}")
    return BaseOverlay(reader, base, saved["tensors"])


class BaseOverlay:
    """A WeightsReader: a checkpoint's own tensors, plus `names` (model name → base name) read from `base`."""

    def __init__(self, own, base, names: dict[str, str]):
        self.own, self.base, self.names = own, base, names
        self._own = own.tensors()

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        in_base = self.base.tensors()
        return {**{name: in_base[source] for name, source in self.names.items()}, **self._own}

    def get(self, name: str) -> torch.Tensor:
        return self.own.get(name) if name in self._own else self.base.get(self.names[name])


def load_base(folder: Path, engine) -> None:
    """Before `engine.load_state(folder)` of a checkpoint holding only LoRA adapters (base.json) into a model built
    without its base (`bigtrain eval`): the base tensors, loaded from the base."""
    if not (folder / BASE_FILE).is_file():
        return
    names = safe_load.read_json(folder / BASE_FILE)["tensors"]
    engine.skip_saving = frozenset(names)
    engine.load_model_weights(LazyWeights(open_weights(folder), {name: name for name in names}))


class LazyWeights(Mapping):
    """{model tensor name: full tensor} whose values a WeightsReader reads on lookup (never kept)."""

    def __init__(self, reader, names: dict[str, str]):
        self.reader, self.names = reader, names  # model name -> the name in the checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.get(self.names[name])

    def __contains__(self, name: object) -> bool:  # Mapping's would read the tensor (a `get` that may raise)
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
