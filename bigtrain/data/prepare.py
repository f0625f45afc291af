"""Prepare and open the token cache: documents → tokenizer → EOS-separated token shards, once.

`prepare_data` runs once per (source, split, task and the columns it reads, tokenizer,
seq_len) — `bigtrain prepare` calls it on one process — and writes `cache_dir/<key>/`; every
rank then calls `load_prepared` with the same task, which only memmaps and verifies. What
an example is for each task is in `examples.py`; what a sample is, in `dataset.py`. The
folder is built beside its final place and renamed into it whole, with index.json written
last, so an interrupted prepare never leaves a cache that looks complete.

The build folder's name is fixed per cache key (one prepare at a time holds its lock), and each split
is tokenized in pieces (`pieces.py`), so a prepare killed midway keeps its finished pieces and joined
splits and the next one does only the rest; one killed once index.json is written leaves only the
publishing to do. A kill at any file operation needs nothing removed by hand.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bigtrain.data.dataset import TokenDataset
from bigtrain.data.examples import check_labels, check_seq_len, check_task, label_set, sft_chat_template, task_columns
from bigtrain.data.pieces import (PLAN, SPLITS, STREAM_PIECE_DOCS, PieceJob, kept_work, piece_plan, read_plan,
                                  remove_build_marks, stream_text, tokenize_split, tokenize_streams)
from bigtrain.data.shards import FORMAT_VERSION, INDEX, read_index, token_dtype, verify_split, write_json_atomic
from bigtrain.data.sources import Source, load_documents, resolve_source, stable_hash, stream_documents
from bigtrain.data.tokenizer import (
    build_tokenizer,
    find_special_ids,
    load_tokenizer_file,
    require_mask,
    tokenizer_file,
    tokenizer_identity,
    trained_tokenizer_path,
)
from bigtrain.core.errors import UserError
from bigtrain.core.fsio import fsync_dir, fsync_tree, remove_partial_writes

if TYPE_CHECKING:
    import tokenizers

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PreparedData:
    """A prepared cache, opened: the tokenizer, its special ids, and both splits as samples.

    cls_id and sep_id fall back to the EOS when the tokenizer has none; mask_id is None then.
    special_ids: every special token id (masked_lm never masks these). labels: the
    classification labels in id order (ints or strings, as in the data), else None.
    """

    path: Path
    tokenizer: "tokenizers.Tokenizer"
    vocab_size: int
    eos_id: int
    pad_id: int
    seq_len: int
    train: TokenDataset
    validation: TokenDataset
    task: str = "causal_lm"
    mask_id: int | None = None
    cls_id: int | None = None  # None here means the EOS
    sep_id: int | None = None  # None here means the EOS
    special_ids: tuple[int, ...] = ()
    labels: list | None = None

    def __post_init__(self):
        self.cls_id = self.eos_id if self.cls_id is None else self.cls_id
        self.sep_id = self.eos_id if self.sep_id is None else self.sep_id
        self.special_ids = self.special_ids or tuple(sorted({self.eos_id, self.pad_id}))


def data_cache_path(cfg, *, task: str = "causal_lm") -> Path:
    """The folder `prepare_data(cfg, task=task)` writes. Cheap: it stats source files and trains nothing.
    (A mixture has one per source: `source_configs`.)"""
    if cfg.mixture:
        raise ValueError("a data.mixture has one cache per source: see source_configs")
    check_task(task)
    source = resolve_source(cfg)
    return _cache_root(cfg) / _data_key(cfg, source, task)


def prepare_data(
    cfg, *, task: str = "causal_lm", num_proc: int | None = None, workers: int = 1, log: Callable[[str], None] = print
) -> PreparedData:
    """Tokenize `cfg`'s documents for `task` into the cache (if not there yet) and open it.

    task: causal_lm | masked_lm | classification | sft (the run passes cfg.task.name).
    num_proc: processes `datasets` may use to read local files or hub data.
    workers: processes tokenizing pieces at once (1: this process, with the tokenizer's own threads).
    """
    check_task(task)
    check_seq_len(cfg, task)
    source = resolve_source(cfg)
    root = _cache_root(cfg)
    path = root / _data_key(cfg, source, task)
    if read_index(path) is not None:
        log(f"data: already prepared at {path}")
        return _open_prepared(cfg, path, task=task, verify=False)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{path.name}", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one prepare per cache key at a time; a second one waits, then opens it
        except OSError:  # a filesystem without locks (some parallel filesystems): prepare unguarded, as before
            log(f"data: cannot lock {lock.name}; make sure one prepare of this data runs at a time")
        if read_index(path) is not None:
            log(f"data: prepared meanwhile by another process at {path}")
            return _open_prepared(cfg, path, task=task, verify=False)
        return _prepare_locked(cfg, task, source, root, path, num_proc, max(1, workers), log)


def _prepare_locked(cfg, task: str, source: Source, root: Path, path: Path, num_proc, workers: int, log) -> PreparedData:
    tmp = root / f".tmp-{path.name}"  # the same folder for the same key: a killed prepare's work is kept
    if read_index(tmp) is not None:
        log(f"data: {tmp} was built whole by an interrupted prepare; publishing it")
    else:
        _build(cfg, task, source, root, tmp, num_proc, workers, log)
    _publish_built(tmp, path)
    data = _open_prepared(cfg, path, task=task, verify=False)
    log(
        f"data: prepared {path} — train {data.train.num_tokens:,} tokens ({len(data.train):,} samples), "
        f"validation {data.validation.num_tokens:,} tokens ({len(data.validation):,} samples), "
        f"dtype {data.train.dtype.name}"
    )
    return data


def _build(cfg, task: str, source: Source, root: Path, tmp: Path, num_proc, workers: int, log) -> None:
    """Tokenize into the build folder `tmp`, keeping what a killed prepare of the same key finished there;
    index.json last, once everything it lists is fsynced."""
    if cfg.tokenizer is not None:  # a missing mask token is known before any document is read
        require_mask(find_special_ids(load_tokenizer_file(cfg.tokenizer, where="data.tokenizer")), cfg, task)
    docs, streams, labels, tok = _documents_and_tokenizer(cfg, task, source, root, num_proc, log)
    tokenizer_path = tokenizer_file(cfg.tokenizer) if cfg.tokenizer else trained_tokenizer_path(cfg, source, root, task)
    ids = find_special_ids(tok)
    require_mask(ids, cfg, task)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    plan = _kept_or_new_plan(tmp, docs, workers)
    tmp.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tmp / PLAN, plan)
    try:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        label_ids = {label: i for i, label in enumerate(labels or [])}
        if streams is not None:
            splits = tokenize_streams(PieceJob(None, cfg, task, tok, ids, tmp, dtype, label_ids), streams,
                                       plan["piece_docs"], workers, log)
        else:
            assert docs is not None  # not streaming: load_documents gave them
            splits = {}
            for name, split_docs in zip(SPLITS, (docs.train, docs.validation)):
                job = PieceJob(split_docs, cfg, task, tok, ids, tmp / name, dtype, label_ids)
                splits[name] = tokenize_split(job, plan[name], workers, name, log)
        index = {
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": ids.eos,
            "pad_id": ids.pad,
            "mask_id": ids.mask,
            "cls_id": ids.cls,
            "sep_id": ids.sep,
            "special_ids": list(ids.all),
            "seq_len": cfg.seq_len,
            "source": cfg.source,
            "task": task,
            "columns": task_columns(cfg, task),
            "text_column": cfg.text_column,
            "labels": labels,
            "tokenizer": tokenizer_identity(cfg, source, task),
            "splits": splits,
        }
        fsync_tree(tmp)  # what index.json lists is on disk before it
        write_json_atomic(tmp / INDEX, index)  # last: it marks the folder complete
        fsync_dir(tmp)
    except BaseException:
        if not kept_work(tmp):  # nothing finished worth keeping for the next prepare
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _documents_and_tokenizer(cfg, task: str, source: Source, root: Path, num_proc, log):
    """(documents, streams, labels, tokenizer): the source's documents (streamed: an iterator of each split's, counted
    as they come), a classifier's label set (fixed by the training split, checked before anything is tokenized),
    and the tokenizer (data.tokenizer's, or trained on the training text)."""
    labels = docs = streams = None
    if cfg.streaming:
        streams = stream_documents(cfg, source, cache_dir=root)
        log(f"data: streaming '{cfg.source}'")
        tok = build_tokenizer(cfg, source, None, cache_dir=root, task=task, log=log,
                              text_batches=stream_text(streams, cfg, task))
    else:
        docs = load_documents(cfg, source, cache_dir=root, num_proc=num_proc, task=task)
        log(f"data: {len(docs.train)} train and {len(docs.validation)} validation documents from '{cfg.source}'")
        if task == "classification":
            labels = label_set(list(docs.train[cfg.label_column]), cfg.label_column)
            check_labels(list(docs.validation[cfg.label_column]), labels, cfg.label_column, "validation")
            log(f"data: {len(labels)} labels from the training split")
        tok = build_tokenizer(cfg, source, docs.train, cache_dir=root, task=task, log=log)
    return docs, streams, labels, tok


def _kept_or_new_plan(tmp: Path, docs, workers: int) -> dict:
    """The piece plan of build folder `tmp`: a killed prepare's, when it cut these documents (its pieces are kept,
    whatever number of workers cut them), else a new one (`tmp` emptied). `docs` None: streamed documents, counted
    as they come, in pieces of a fixed size."""
    if docs is None:
        plan: dict = {"streaming": True, "piece_docs": STREAM_PIECE_DOCS}
        keep = read_plan(tmp) == plan if tmp.exists() else False
    else:
        plan = {name: piece_plan(len(split_docs), workers) for name, split_docs in zip(SPLITS, (docs.train, docs.validation))}
        kept = read_plan(tmp) if tmp.exists() else None
        keep = kept is not None and all(kept.get(name, {}).get("num_docs") == plan[name]["num_docs"] for name in SPLITS)
        plan = kept if keep and kept is not None else plan
    if tmp.exists() and not keep:
        shutil.rmtree(tmp)  # not pieces of these documents
    return plan


def source_configs(cfg, *, task: str = "causal_lm") -> list:
    """The data configs that get a cache each: `cfg`, or the sources of its data.mixture on their shared
    tokenizer — data.tokenizer, or the BPE trained on the first source (its file, once that one is prepared)."""
    if not cfg.mixture:
        return [cfg]
    from bigtrain.data.mixture import mixture_parts

    parts = [part.cfg for part in mixture_parts(cfg)]
    first = data_cache_path(parts[0], task=task)
    if parts[0].tokenizer is None and read_index(first) is not None:
        parts[1:] = [dataclasses.replace(part, tokenizer=str(first / TOKENIZER_FILE)) for part in parts[1:]]
    return parts


def prepare_sources(cfg, *, task: str = "causal_lm", workers: int = 1, log: Callable[[str], None] = print) -> list:
    """`prepare_data` for `cfg`, or for each source of its mixture in order (the first one's tokenizer serving all)."""
    return [prepare_data(source_configs(cfg, task=task)[i], task=task, workers=workers, log=log)
            for i in range(len(cfg.mixture) or 1)]


def verify_sources_once(cfg, *, task: str = "causal_lm") -> list:
    """`verify_prepared_once` for `cfg` or each source of its mixture."""
    return [verify_prepared_once(source, task=task) for source in source_configs(cfg, task=task)]


TRAINING_PREPARE_LIMIT_BYTES = 2 * 10**9  # a multi-process training start tokenizes at most this much source itself


def training_prepare_problem(cfg, *, task: str, world_size: int, under_slurm: bool,
                             limit_bytes: int = TRAINING_PREPARE_LIMIT_BYTES) -> str | None:
    """Why a training start of `world_size` processes must not prepare this data itself, or None. Rank 0 would
    tokenize it single-process while every other rank (and its GPU) waits: refused under Slurm (slurm/launch.sh
    prepares first, so a missing cache there means a job started another way), for hub datasets, and for local
    sources over `limit_bytes`."""
    if cfg.mixture:
        problems = (training_prepare_problem(part, task=task, world_size=world_size, under_slurm=under_slurm,
                                             limit_bytes=limit_bytes) for part in source_configs(cfg, task=task))
        return next((problem for problem in problems if problem), None)
    path = data_cache_path(cfg, task=task)
    if world_size == 1 or read_index(path) is not None:
        return None
    source = resolve_source(cfg)
    size = sum(f.stat().st_size for f in source.files) if source.files else None
    if under_slurm:
        why = "under Slurm"
    elif source.kind == "hub":
        why = f"hub dataset '{cfg.source}'"
    elif size is not None and size > limit_bytes:
        why = f"{size / 1e9:.1f} GB of source files (over {limit_bytes / 1e9:g} GB)"
    else:
        return None
    return (f"data: not prepared ({path}) and this {world_size}-process start would tokenize it on rank 0 while the "
            f"other ranks wait ({why}) — run 'bigtrain prepare RECIPE' first, on one node with all its CPUs "
            f"(slurm/pretrain.sh and finetune.sh do it as their first step)")


def cache_visible(cfg, *, task: str) -> bool:
    """Whether this process sees the prepared cache (a rank on another node may not: a node-local cache_dir)."""
    return all(read_index(data_cache_path(source, task=task)) is not None for source in source_configs(cfg, task=task))


VERIFIED = "verified.json"


def load_prepared(cfg, *, task: str = "causal_lm", verify: bool = True, seed: int = 0) -> PreparedData:
    """Open the cache `prepare_data(cfg, task=task)` wrote. File sizes are always checked; verify=True adds sha256.
    A mixture: its sources' caches, the training samples in the mixture's order (keyed by `seed`, run.seed)."""
    if cfg.mixture:
        from bigtrain.data.mixture import open_mixture

        return open_mixture(cfg, [load_prepared(source, task=task, verify=verify) for source in source_configs(cfg, task=task)],
                            seed=seed)
    return _open_prepared(cfg, data_cache_path(cfg, task=task), task=task, verify=verify)


def verify_prepared_once(cfg, *, task: str = "causal_lm") -> PreparedData:
    """Open the prepared cache, checksumming it the first time a run opens it, and record that (`verified.json`,
    keyed by index.json's hash): later starts and requeues check file sizes only, not every byte."""
    path = data_cache_path(cfg, task=task)
    marker = path / VERIFIED
    index_sha = hashlib.sha256((path / INDEX).read_bytes()).hexdigest()
    try:
        done = json.loads(marker.read_text()).get("index_sha256") == index_sha
    except (OSError, ValueError, AttributeError):
        done = False
    data = _open_prepared(cfg, path, task=task, verify=not done)
    if not done:
        try:
            write_json_atomic(marker, {"index_sha256": index_sha})
        except OSError:
            pass  # a read-only cache: checksummed again next time
    return data


def _open_prepared(cfg, path: Path, *, task: str, verify: bool) -> PreparedData:
    index = read_index(path)
    if index is None:
        raise UserError(f"data: not prepared for task {task} (no {path / INDEX}) — run 'bigtrain prepare RECIPE'")
    dtype = np.dtype(index["dtype"])
    for name in SPLITS:
        verify_split(path, name, index["splits"][name], dtype, checksums=verify)
    splits = {
        name: TokenDataset(path / name, index["splits"][name], dtype, seq_len=cfg.seq_len, packing=cfg.packing, task=task)
        for name in SPLITS
    }
    return PreparedData(
        path=path,
        tokenizer=load_tokenizer_file(path / TOKENIZER_FILE, where="data cache"),
        vocab_size=index["vocab_size"],
        eos_id=index["eos_id"],
        pad_id=index["pad_id"],
        seq_len=cfg.seq_len,
        train=splits["train"],
        validation=splits["validation"],
        task=task,
        mask_id=index.get("mask_id"),
        cls_id=index.get("cls_id"),
        sep_id=index.get("sep_id"),
        special_ids=tuple(index.get("special_ids", ())),
        labels=index.get("labels"),
    )


def _publish_built(tmp: Path, path: Path) -> None:
    """Publish a build folder whose index.json is written (again after a kill, as often as it takes): the build's
    bookkeeping and a killed writer's temporary files removed, then renamed into place, durably."""
    remove_build_marks(tmp)
    remove_partial_writes(tmp)
    _publish(tmp, path)
    fsync_dir(path.parent)


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    if path.exists() and read_index(path) is None:
        shutil.rmtree(path)  # incomplete leftovers (index.json removed by hand): never trusted
    try:
        os.replace(tmp, path)
    except OSError:
        if read_index(path) is None:
            raise


def _data_key(cfg, source: Source, task: str) -> str:
    template = sft_chat_template(cfg, task)
    return stable_hash(
        f"data-v{FORMAT_VERSION}",
        source.identity,
        task,
        task_columns(cfg, task),
        cfg.max_documents,
        cfg.validation_split,
        tokenizer_identity(cfg, source, task),
        cfg.seq_len,
        *([f"chat-template:{template.identity()}"] if template else []),
        *(["streaming"] if cfg.streaming else []),  # (a held-out split without the tiny-corpus fallbacks)
    )


def _cache_root(cfg) -> Path:
    return Path(cfg.cache_dir).expanduser()
