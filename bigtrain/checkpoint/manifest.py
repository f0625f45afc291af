"""A checkpoint's manifest: the size and sha256 of every file, taken as the files are written (core/filehash.py) or
hashed after by the ranks in parallel, and its verification — collective, each rank the files it loads next, the
first problem raised on every rank — by whole files, or (init_from, which reads only the weights) by a shard's
"weights" part."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bigtrain.core import filehash, safe_load
from bigtrain.core.errors import UserError
from bigtrain.core.fsio import fsync_dir as _fsync_dir
from bigtrain.core.fsio import fsync_file
from bigtrain.parallel import Dist, weights_digests
from bigtrain.parallel.dist import all_gather_object

MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint is missing, truncated or corrupted; the message names the file."""


# Files one rank of the saving job wrote and the same rank of a job of that size loads: DCP's shard (`__R_0.distcp`),
# ZeRO's partitions (`zero_pp_rank_R_…`), the rank's rng and EMA files; and the single/ddp state rank 0 alone reads
# and broadcasts (parallel/local.py `load_on_main`).
_RANK_FILE = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|zero_pp_rank_(\d+)_[^/]*|rng/rank-(\d+)\.pt|ema-rank-(\d+)\.pt)$")
_MAIN_FILES = {"model.pt", "optimizer.pt", "ema.pt"}


def _shares(names: list[tuple[str, int]], world_size: int) -> list[list[str]]:
    """Split files among ranks, each read once: a rank's own file (`_RANK_FILE`, when that rank exists here; single/ddp
    state to rank 0) to that rank, so verifying it reads what the rank loads next anyway; the rest largest first to
    the least loaded rank."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads, rest = [0] * world_size, []
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
        for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            _fsync_dir(directory)


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
