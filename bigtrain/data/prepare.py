"""Prepare and open the token cache: documents → tokenizer → EOS-separated token shards, once.

`prepare_data` runs once per (source, split, task and the columns it reads, tokenizer,
seq_len) — `bigtrain prepare` calls it on one process — and writes `cache_dir/<key>/`; every
rank then calls `load_prepared` with the same task, which only memmaps and verifies. What
an example is for each task is in `examples.py`; what a sample is, in `dataset.py`. The
folder is built beside its final place and renamed into it whole, with index.json written
last, so an interrupted prepare never leaves a cache that looks complete.

Each split is tokenized in pieces of consecutive documents (`_piece_plan`), by `workers` processes
at once (forked: they share the loaded documents and the tokenizer), each into shards of its own;
its `piece-NNNNN.json`, written last, marks it done. The build folder's name is fixed per cache key
(one prepare at a time holds its lock), so a prepare killed midway keeps its finished pieces and the
next one tokenizes only the rest. The join then renames the pieces' shards, in order, into the split's
`tokens-NNNNN.bin` (no copy) and joins their document offsets and per-task arrays. The token stream is
the same whatever the number of workers or pieces.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bigtrain.data.dataset import TokenDataset
from bigtrain.data.examples import (
    POSITION_ARRAYS,
    TASK_ARRAYS,
    check_labels,
    check_seq_len,
    check_task,
    encode_batch,
    label_set,
    sft_chat_template,
    task_columns,
)
from bigtrain.data.shards import (DOC_OFFSETS, FORMAT_VERSION, INDEX, SplitWriter, read_index, token_dtype, verify_split,
                                  write_json_atomic)
from bigtrain.filehash import sha256
from bigtrain.data.sources import Source, load_documents, resolve_source, stable_hash, stream_documents
from bigtrain.data.tokenizer import (
    SpecialIds,
    build_tokenizer,
    find_special_ids,
    load_tokenizer_file,
    require_mask,
    tokenizer_identity,
    trained_tokenizer_path,
)
from bigtrain.errors import UserError

if TYPE_CHECKING:
    import datasets
    import tokenizers

SPLITS = ("train", "validation")
TOKENIZER_FILE = "tokenizer.json"
_ENCODE_BATCH_DOCS = 1000
_LOG_EVERY_S = 30.0  # progress lines without a terminal; on one, the line is redrawn every second
_PIECE_DOCS = (256, 20_000)  # documents per piece: at least, at most (~4 pieces per worker in between)
PLAN = "plan.json"  # in the build folder: the piece plan a resumed prepare must share to keep pieces


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
    if cfg.tokenizer is not None:  # a missing mask token is known before any document is read
        require_mask(find_special_ids(load_tokenizer_file(cfg.tokenizer, where="data.tokenizer")), cfg, task)

    labels = docs = streams = None
    if cfg.streaming:
        streams = stream_documents(cfg, source, cache_dir=root)
        log(f"data: streaming '{cfg.source}'")
        tok = build_tokenizer(cfg, source, None, cache_dir=root, task=task, log=log,
                              text_batches=_stream_text(streams, cfg, task))
    else:
        docs = load_documents(cfg, source, cache_dir=root, num_proc=num_proc, task=task)
        log(f"data: {len(docs.train)} train and {len(docs.validation)} validation documents from '{cfg.source}'")
        if task == "classification":  # fixed by the training split; checked before anything is tokenized
            labels = label_set(list(docs.train[cfg.label_column]), cfg.label_column)
            check_labels(list(docs.validation[cfg.label_column]), labels, cfg.label_column, "validation")
            log(f"data: {len(labels)} labels from the training split")
        tok = build_tokenizer(cfg, source, docs.train, cache_dir=root, task=task, log=log)
    tokenizer_file = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else trained_tokenizer_path(cfg, source, root, task)
    ids = find_special_ids(tok)
    require_mask(ids, cfg, task)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    tmp = root / f".tmp-{path.name}"  # the same folder for the same key: a killed prepare's pieces are kept
    if streams is not None:  # documents are counted as they come: pieces of a fixed size
        plan = {"streaming": True, "piece_docs": _PIECE_DOCS[1]}
        keep = _read_plan(tmp) == plan if tmp.exists() else False
    else:
        plan = {name: _piece_plan(len(split_docs), workers) for name, split_docs in zip(SPLITS, (docs.train, docs.validation))}
        kept = _read_plan(tmp) if tmp.exists() else None
        keep = kept is not None and all(kept.get(name, {}).get("num_docs") == plan[name]["num_docs"] for name in SPLITS)
        plan = kept if keep else plan  # a killed prepare's pieces, whatever number of workers cut them
    if tmp.exists() and not keep:
        shutil.rmtree(tmp)  # not pieces of these documents
    tmp.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tmp / PLAN, plan)
    try:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        label_ids = {label: i for i, label in enumerate(labels or [])}
        if streams is not None:
            splits = _tokenize_streams(_PieceJob(None, cfg, task, tok, ids, tmp, dtype, label_ids), streams,
                                       plan["piece_docs"], workers, log)
        else:
            splits = {}
            for name, split_docs in zip(SPLITS, (docs.train, docs.validation)):
                job = _PieceJob(split_docs, cfg, task, tok, ids, tmp / name, dtype, label_ids)
                splits[name] = _tokenize_split(job, plan[name], workers, name, log)
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
        (tmp / PLAN).unlink()
        write_json_atomic(tmp / INDEX, index)  # last: it marks the folder complete
        _publish(tmp, path)
    except BaseException:
        if not any(tmp.glob("*/piece-*.json")):  # nothing finished worth keeping for the next prepare
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    data = _open_prepared(cfg, path, task=task, verify=False)
    log(
        f"data: prepared {path} — train {data.train.num_tokens:,} tokens ({len(data.train):,} samples), "
        f"validation {data.validation.num_tokens:,} tokens ({len(data.validation):,} samples), dtype {dtype.name}"
    )
    return data


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


@dataclass
class _PieceJob:
    """What tokenizing a piece of one split needs (forked workers inherit it)."""

    docs: "datasets.Dataset"
    cfg: object
    task: str
    tok: "tokenizers.Tokenizer"
    ids: SpecialIds
    folder: Path
    dtype: np.dtype
    label_ids: dict


def _piece_plan(num_docs: int, workers: int) -> dict:
    """Documents per piece for a split of `num_docs`: ~4 pieces per worker, within _PIECE_DOCS."""
    low, high = _PIECE_DOCS
    per_piece = min(high, max(low, -(-num_docs // (4 * workers))))
    return {"num_docs": num_docs, "piece_docs": per_piece, "pieces": -(-num_docs // per_piece)}


def _read_plan(tmp: Path) -> dict | None:
    try:
        return json.loads((tmp / PLAN).read_text())
    except (OSError, ValueError):
        return None


def _piece_prefix(k: int) -> str:
    return f"piece-{k:05d}-"


def _piece_done(folder: Path, k: int) -> Path:
    return folder / f"piece-{k:05d}.json"


_job: _PieceJob | None = None  # set before workers fork


def _tokenize_piece(k: int, piece_docs: int, folder: Path | None = None, rows: dict | None = None) -> dict:
    """Tokenize documents [k·piece_docs, …) of the job's split into the piece's own files in `folder` (default the
    job's), its json last; `rows`: the piece's documents themselves (column -> list; a stream's)."""
    job = _job
    folder = folder or job.folder
    for stale in folder.glob(f"{_piece_prefix(k)}*"):  # a killed prepare's half-written piece
        stale.unlink()
    writer = SplitWriter(folder, job.dtype, arrays=TASK_ARRAYS.get(job.task), prefix=_piece_prefix(k))
    columns = list(task_columns(job.cfg, job.task).values())
    if rows is None:
        docs = job.docs.select(range(k * piece_docs, min((k + 1) * piece_docs, len(job.docs)))).select_columns(columns)
        batches = docs.iter(batch_size=_ENCODE_BATCH_DOCS)
    else:
        n = len(rows[columns[0]])
        batches = ({c: rows[c][i:i + _ENCODE_BATCH_DOCS] for c in columns} for i in range(0, n, _ENCODE_BATCH_DOCS))
    for batch in batches:
        encoded = encode_batch(batch, job.cfg, job.task, job.tok, job.ids, label_ids=job.label_ids)
        examples = encoded.examples  # each without its EOS
        lengths = np.fromiter((len(x) + 1 for x in examples), dtype=np.int64, count=len(examples))  # + EOS
        is_eos = np.zeros(int(lengths.sum()), dtype=bool)
        is_eos[np.cumsum(lengths) - 1] = True
        tokens = np.empty(is_eos.size, dtype=job.dtype)
        tokens[is_eos] = job.ids.eos
        tokens[~is_eos] = np.fromiter(itertools.chain.from_iterable(examples), dtype=job.dtype,
                                      count=is_eos.size - len(examples))
        arrays = {key: v + writer.num_tokens if key in POSITION_ARRAYS else v for key, v in encoded.arrays.items()}
        writer.add_documents(tokens, lengths, arrays)
    info = writer.finish()
    write_json_atomic(_piece_done(folder, k), info)
    return info


def _worker_start() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism


def _tokenize_split(job: _PieceJob, plan: dict, workers: int, name: str, log: Callable) -> dict:
    """Tokenize the split's pieces not done yet (`workers` at a time), then join them into the split's files."""
    global _job
    job.folder.mkdir(parents=True, exist_ok=True)
    pieces, piece_docs = plan["pieces"], plan["piece_docs"]
    todo = [k for k in range(pieces) if not _piece_done(job.folder, k).is_file()]
    if len(todo) < pieces:
        log(f"data: {name}: {pieces - len(todo)} of {pieces} pieces kept from an interrupted prepare")
    progress = _Progress(name, plan["num_docs"], done_docs=(pieces - len(todo)) * piece_docs, log=log)
    _job = job
    try:
        if workers == 1 or len(todo) <= 1:
            for k in todo:
                progress.add(_tokenize_piece(k, piece_docs))
        else:
            context = multiprocessing.get_context("fork")  # workers share the loaded documents and the tokenizer
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_worker_start) as pool:
                for future in as_completed([pool.submit(_tokenize_piece, k, piece_docs) for k in todo]):
                    progress.add(future.result())
    finally:
        _job = None
    info = _join_pieces(job, pieces)
    log(f"data: {name}: {info['num_tokens']:,} tokens from {info['num_docs']:,} documents in "
        f"{progress.seconds():.1f}s ({workers} worker{'s' if workers > 1 else ''})")
    return info


def _stream_text(streams, cfg, task: str) -> "Iterator[list[str]]":
    """The training text a BPE trains on from a stream (held-out rows left out), in batches: a streamed BPE reads
    the stream's beginning, up to data.tokenizer_sample_bytes (a stream has no uniform sample short of reading
    it whole)."""
    from bigtrain.data.examples import bpe_text_columns

    columns, row = bpe_text_columns(cfg, task), 0
    for batch in _checked_batches(streams.train, columns, cfg):
        n = len(batch[columns[0]])
        keep = [not streams.held_out(row + i) for i in range(n)]
        row += n
        yield [text for column in columns for text, k in zip(batch[column], keep) if k and text]


def _tokenize_streams(job: _PieceJob, streams, piece_docs: int, workers: int, log: Callable) -> dict:
    """data.streaming: read the train stream (and the validation one) once, routing held-out rows to validation,
    and tokenize each full piece of piece_docs documents as it fills (`workers` at a time, at most two pieces
    each waiting); pieces a killed prepare finished are read past, not tokenized again. Then join each split."""
    global _job
    columns = list(task_columns(job.cfg, job.task).values())
    folders = {name: job.folder / name for name in SPLITS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    count = dict.fromkeys(SPLITS, 0)  # pieces started per split
    buffers = {name: {c: [] for c in columns} for name in SPLITS}
    progress = _Progress("train + validation", None, done_docs=0, log=log)
    pending: list = []
    _job = job
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start)
            if workers > 1 else None)

    def flush(name: str) -> None:
        rows, k = buffers[name], count[name]
        buffers[name], count[name] = {c: [] for c in columns}, k + 1
        if _piece_done(folders[name], k).is_file():
            return  # done before the kill
        if pool is None:
            progress.add(_tokenize_piece(k, piece_docs, folders[name], rows))
            return
        pending.append(pool.submit(_tokenize_piece, k, piece_docs, folders[name], rows))
        while len(pending) > 2 * workers:  # read no further ahead than that
            progress.add(pending.pop(0).result())

    def add(name: str, batch: dict) -> None:
        for i in range(len(batch[columns[0]])):
            for c in columns:
                buffers[name][c].append(batch[c][i])
            if len(buffers[name][columns[0]]) == piece_docs:
                flush(name)

    try:
        row = 0
        for batch in _checked_batches(streams.train, columns, job.cfg):
            n = len(batch[columns[0]])
            held = [streams.held_out(row + i) for i in range(n)]
            for name, keep in (("train", [not h for h in held]), ("validation", held)):
                if any(keep):
                    add(name, {c: [v for v, k in zip(batch[c], keep) if k] for c in columns})
            row += n
        if streams.validation is not None:
            for batch in _checked_batches(streams.validation, columns, job.cfg):
                add("validation", batch)
        for name in SPLITS:
            if buffers[name][columns[0]]:
                flush(name)
        for future in pending:
            progress.add(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _job = None
    splits = {}
    for name in SPLITS:
        splits[name] = _join_pieces(dataclasses.replace(job, folder=folders[name]), count[name])
    log(f"data: {splits['train']['num_tokens']:,} train and {splits['validation']['num_tokens']:,} validation tokens "
        f"streamed in {progress.seconds():.1f}s ({workers} worker{'s' if workers > 1 else ''})")
    return splits


def _checked_batches(stream, columns: list[str], cfg) -> "Iterator[dict]":
    """A stream's documents in batches of their columns `columns`, the first batch checked to have them."""
    for batch in stream.iter(batch_size=_ENCODE_BATCH_DOCS):
        missing = [c for c in columns if c not in batch]
        if missing:
            have = ", ".join(batch) or "none"
            raise UserError(f"data: no column '{missing[0]}' in '{cfg.source}' (columns: {have})")
        yield {c: batch[c] for c in columns}


def _join_pieces(job: _PieceJob, pieces: int) -> dict:
    """The split's index entry: the pieces' shards in order, their document offsets and per-task arrays joined
    (written through memmaps: nothing of corpus size in memory); the pieces' own small files removed."""
    folder = job.folder
    infos = [json.loads(_piece_done(folder, k).read_text()) for k in range(pieces)]
    num_docs = sum(i["num_docs"] for i in infos)
    token_starts = np.cumsum([0] + [i["num_tokens"] for i in infos])
    offsets = _new_npy(folder / DOC_OFFSETS, np.int64, (num_docs + 1,))
    at = 0
    for k, info in enumerate(infos):
        piece = np.load(folder / f"{_piece_prefix(k)}{DOC_OFFSETS}", mmap_mode="r")
        offsets[at:at + info["num_docs"]] = piece[:-1] + token_starts[k]
        at += info["num_docs"]
    offsets[num_docs] = token_starts[-1]
    offsets.flush()
    del offsets
    arrays = []
    for array, empty in TASK_ARRAYS.get(job.task, {}).items():
        parts = [np.load(folder / f"{_piece_prefix(k)}{array}.npy", mmap_mode="r") for k in range(pieces)]
        path = folder / f"{array}.npy"
        out = _new_npy(path, empty.dtype, (sum(len(p) for p in parts), *empty.shape[1:]))
        row = 0
        for k, part in enumerate(parts):
            out[row:row + len(part)] = part + token_starts[k] if array in POSITION_ARRAYS else part
            row += len(part)
        if isinstance(out, np.memmap):
            out.flush()
        del out, parts
        arrays.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
    shards = [dict(shard) for info in infos for shard in info["shards"]]
    for j, shard in enumerate(shards):  # the split's shards in stream order: tokens-00000.bin, tokens-00001.bin, …
        name = f"tokens-{j:05d}.bin"
        if (folder / shard["file"]).exists() or not (folder / name).exists():  # renamed already by a killed join
            os.replace(folder / shard["file"], folder / name)
        shard["file"] = name
    for k in range(pieces):
        for leftover in [folder / f"{_piece_prefix(k)}{DOC_OFFSETS}", _piece_done(folder, k),
                         *(folder / f"{_piece_prefix(k)}{a}.npy" for a in TASK_ARRAYS.get(job.task, {}))]:
            leftover.unlink()
    return {
        "num_tokens": int(token_starts[-1]),
        "num_docs": num_docs,
        "shards": shards,
        "doc_offsets_sha256": sha256(folder / DOC_OFFSETS),
        "arrays": arrays,
    }


def _new_npy(path: Path, dtype, shape: tuple) -> np.ndarray:
    """A new .npy file of `shape`, memory-mapped for writing (an empty one is written at once: nothing to map)."""
    if 0 in shape:
        empty = np.zeros(shape, dtype)
        np.save(path, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


class _Progress:
    """Documents and tokens done, tokens/s and ETA: a line redrawn every second on a terminal, else a line
    every _LOG_EVERY_S through `log`."""

    def __init__(self, name: str, total_docs: int | None, *, done_docs: int, log: Callable):
        """total_docs None: not known (a stream): no percentage or ETA."""
        self.name, self.total, self.log = name, total_docs, log
        self.done = done_docs if total_docs is None else min(done_docs, total_docs)
        self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.tty = log is print and sys.stdout.isatty()

    def add(self, piece: dict) -> None:
        self.done += piece["num_docs"]
        self.tokens += piece["num_tokens"]
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self.last < (1.0 if self.tty else _LOG_EVERY_S) and not finished:
            return
        self.last = now
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.total is None:
            line = f"data: {self.name}: {self.done:,} documents · {self.tokens:,} tokens · {rate:,.0f} tokens/s"
        else:
            per_doc = (now - self.t0) / max(self.done, 1)
            line = (f"data: {self.name}: {self.done:,}/{self.total:,} documents ({100 * self.done / max(self.total, 1):.0f}%)"
                    f" · {rate:,.0f} tokens/s · ETA {_duration((self.total - self.done) * per_doc)}")
        if self.tty:
            print(f"\r{line}", end="\n" if finished else "", flush=True)
        else:
            self.log(line)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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
