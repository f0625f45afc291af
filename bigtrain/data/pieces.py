"""Tokenizing one split in pieces: the unit `bigtrain prepare` parallelises, and keeps after a kill.

A piece is a run of consecutive documents (`piece_plan`: ~4 per worker, 256 to 20,000 documents; a
stream's: 20,000 as they come). `workers` forked processes tokenize pieces at once, sharing the loaded
documents and the tokenizer; each writes its own shards and arrays (`piece-NNNNN-*`) and then its
`piece-NNNNN.json`, the mark that it is done. `join_pieces` renames the pieces' shards, in order, into
the split's `tokens-NNNNN.bin` (no copy) and joins their document offsets and per-task arrays through
memmaps. The token stream is the same whatever the number of workers or pieces.

A kill at any file operation loses nothing finished: each step is redone whole or recognised as done. A
piece's files are fsynced before its mark; a join can be repeated until the split's `joined.json` (its index
entry) is written, and only then are the pieces' files removed, so a rerun neither tokenizes a joined split
again nor finds a piece's mark without its files.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from bigtrain.data.examples import POSITION_ARRAYS, TASK_ARRAYS, encode_batch, task_columns
from bigtrain.data.shards import DOC_OFFSETS, SplitWriter, write_json_atomic
from bigtrain.data.tokenizer import SpecialIds
from bigtrain.core.errors import UserError
from bigtrain.core.filehash import sha256
from bigtrain.core.fsio import fsync_dir, fsync_file

if TYPE_CHECKING:
    import datasets
    import tokenizers

SPLITS = ("train", "validation")
PLAN = "plan.json"  # in the build folder: the piece plan a resumed prepare must share to keep pieces
JOINED = "joined.json"  # in a split's build folder: its index entry, once its pieces are joined
_PIECE_DOCS = (256, 20_000)  # documents per piece: at least, at most (~4 pieces per worker in between)
STREAM_PIECE_DOCS = _PIECE_DOCS[1]
_ENCODE_BATCH_DOCS = 1000
_LOG_EVERY_S = 30.0  # progress lines without a terminal; on one, the line is redrawn every second


@dataclass
class PieceJob:
    """What tokenizing a piece of one split needs (forked workers inherit it)."""

    docs: "datasets.Dataset"
    cfg: object
    task: str
    tok: "tokenizers.Tokenizer"
    ids: SpecialIds
    folder: Path
    dtype: np.dtype
    label_ids: dict


def piece_plan(num_docs: int, workers: int) -> dict:
    """Documents per piece for a split of `num_docs`: ~4 pieces per worker, within _PIECE_DOCS."""
    low, high = _PIECE_DOCS
    per_piece = min(high, max(low, -(-num_docs // (4 * workers))))
    return {"num_docs": num_docs, "piece_docs": per_piece, "pieces": -(-num_docs // per_piece)}


def read_plan(tmp: Path) -> dict | None:
    try:
        return json.loads((tmp / PLAN).read_text())
    except (OSError, ValueError):
        return None


def _piece_prefix(k: int) -> str:
    return f"piece-{k:05d}-"


def _piece_done(folder: Path, k: int) -> Path:
    return folder / f"piece-{k:05d}.json"


def _joined(folder: Path) -> dict | None:
    """The split's index entry if a prepare joined its pieces already (their leftovers removed now), else None."""
    try:
        info = json.loads((folder / JOINED).read_text())
    except FileNotFoundError:
        return None
    _remove_pieces(folder)  # a kill may have come while they were being removed
    return info


def _remove_pieces(folder: Path) -> None:
    for leftover in sorted(folder.glob("piece-*")):
        leftover.unlink()


def kept_work(tmp: Path) -> bool:
    """Whether a build folder holds finished pieces or joined splits, worth keeping for the next prepare."""
    return any(tmp.glob("*/piece-*.json")) or any(tmp.glob(f"*/{JOINED}"))


def remove_build_marks(tmp: Path) -> None:
    """The plan and the splits' joined marks, which a build folder needs no more once its index.json is written."""
    for mark in [tmp / PLAN, *(tmp / name / JOINED for name in SPLITS)]:
        mark.unlink(missing_ok=True)


_job: PieceJob | None = None  # set before workers fork


def _tokenize_piece(k: int, piece_docs: int, folder: Path | None = None, rows: dict | None = None) -> dict:
    """Tokenize documents [k·piece_docs, …) of the job's split into the piece's own files in `folder` (default the
    job's), its json last; `rows`: the piece's documents themselves (column -> list; a stream's)."""
    job = _job
    assert job is not None  # set before the workers fork (tokenize_split, tokenize_streams)
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


def tokenize_split(job: PieceJob, plan: dict, workers: int, name: str, log: Callable) -> dict:
    """Tokenize the split's pieces not done yet (`workers` at a time), then join them into the split's files."""
    global _job
    job.folder.mkdir(parents=True, exist_ok=True)
    if (info := _joined(job.folder)) is not None:
        log(f"data: {name}: joined by an interrupted prepare, kept")
        return info
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
    info = join_pieces(job, pieces)
    log(f"data: {name}: {info['num_tokens']:,} tokens from {info['num_docs']:,} documents in "
        f"{progress.seconds():.1f}s ({workers} worker{'s' if workers > 1 else ''})")
    return info


def stream_text(streams, cfg, task: str) -> "Iterator[list[str]]":
    """The training text a BPE trains on from a stream (held-out rows left out), in batches: a streamed BPE reads
    the stream's beginning, up to data.tokenizer_sample_bytes (a stream has no uniform sample short of reading
    it whole)."""
    from bigtrain.data.examples import bpe_text_columns

    columns, row = bpe_text_columns(cfg, task), 0
    for batch in _checked_batches(streams.train, columns, cfg):
        n = len(batch[columns[0]])
        keep = ~streams.held_out(row, n)
        row += n
        yield [text for column in columns for text, k in zip(batch[column], keep) if k and text]


def tokenize_streams(job: PieceJob, streams, piece_docs: int, workers: int, log: Callable) -> dict:
    """data.streaming: read the train stream (and the validation one) once, routing held-out rows to validation,
    and tokenize each full piece of piece_docs documents as it fills (`workers` at a time, at most two pieces
    each waiting); pieces a killed prepare finished are read past, not tokenized again. Then join each split."""
    global _job
    columns = list(task_columns(job.cfg, job.task).values())
    folders = {name: job.folder / name for name in SPLITS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    joined = {name: _joined(folder) for name, folder in folders.items()}
    if all(info is not None for info in joined.values()):
        log("data: train and validation joined by an interrupted prepare, kept")
        return joined
    progress = _Progress("train + validation", None, done_docs=0, log=log)
    _job = job
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start)
            if workers > 1 else None)
    pieces = _StreamPieces(columns, folders, joined, piece_docs, workers, pool, progress)
    try:
        row = 0
        for batch in _checked_batches(streams.train, columns, job.cfg):
            n = len(batch[columns[0]])
            held = streams.held_out(row, n)
            for name, keep in (("train", ~held), ("validation", held)):
                if keep.any():
                    pieces.add(name, {c: [v for v, k in zip(batch[c], keep) if k] for c in columns})
            row += n
        if streams.validation is not None:
            for batch in _checked_batches(streams.validation, columns, job.cfg):
                pieces.add("validation", batch)
        pieces.finish()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _job = None
    splits = {}
    for name in SPLITS:
        splits[name] = join_pieces(dataclasses.replace(job, folder=folders[name]), pieces.count[name])
    log(f"data: {splits['train']['num_tokens']:,} train and {splits['validation']['num_tokens']:,} validation tokens "
        f"streamed in {progress.seconds():.1f}s ({workers} worker{'s' if workers > 1 else ''})")
    return splits


class _StreamPieces:
    """Streamed rows gathered into pieces of `piece_docs` documents per split, each tokenized once full (on the
    pool's workers, at most two pieces each waiting; in this process without a pool); a piece a killed prepare
    finished, or a split it joined, is counted and skipped."""

    def __init__(self, columns: list[str], folders: dict[str, Path], joined: dict, piece_docs: int, workers: int,
                 pool: ProcessPoolExecutor | None, progress: _Progress):
        self.columns, self.folders, self.joined, self.piece_docs = columns, folders, joined, piece_docs
        self.workers, self.pool, self.progress = workers, pool, progress
        self.count = dict.fromkeys(SPLITS, 0)  # pieces started per split
        self.buffers: dict[str, dict[str, list]] = {name: {c: [] for c in columns} for name in SPLITS}
        self.pending: list = []

    def add(self, name: str, batch: dict) -> None:
        columns = self.columns
        for i in range(len(batch[columns[0]])):
            for c in columns:
                self.buffers[name][c].append(batch[c][i])
            if len(self.buffers[name][columns[0]]) == self.piece_docs:
                self.flush(name)

    def flush(self, name: str) -> None:
        rows, k = self.buffers[name], self.count[name]
        self.buffers[name], self.count[name] = {c: [] for c in self.columns}, k + 1
        if self.joined[name] is not None or _piece_done(self.folders[name], k).is_file():
            return  # done before the kill
        if self.pool is None:
            self.progress.add(_tokenize_piece(k, self.piece_docs, self.folders[name], rows))
            return
        self.pending.append(self.pool.submit(_tokenize_piece, k, self.piece_docs, self.folders[name], rows))
        while len(self.pending) > 2 * self.workers:  # read no further ahead than that
            self.progress.add(self.pending.pop(0).result())

    def finish(self) -> None:
        """The last, partial piece of each split; then every piece tokenized."""
        for name in SPLITS:
            if self.buffers[name][self.columns[0]]:
                self.flush(name)
        for future in self.pending:
            self.progress.add(future.result())


def _checked_batches(stream, columns: Sequence[str], cfg) -> "Iterator[dict]":
    """A stream's documents in batches of their columns `columns`, the first batch checked to have them."""
    for batch in stream.iter(batch_size=_ENCODE_BATCH_DOCS):
        missing = [c for c in columns if c not in batch]
        if missing:
            have = ", ".join(batch) or "none"
            raise UserError(f"data: no column '{missing[0]}' in '{cfg.source}' (columns: {have})")
        yield {c: batch[c] for c in columns}


def join_pieces(job: PieceJob, pieces: int) -> dict:
    """The split's index entry: the pieces' shards in order, their document offsets and per-task arrays joined
    (written through memmaps: nothing of corpus size in memory). Every step until `joined.json` (the entry,
    written once the joined files are fsynced) can be repeated after a kill; the pieces' own small files go
    after it."""
    folder = job.folder
    if (joined := _joined(folder)) is not None:
        return joined
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
    assert isinstance(offsets, np.memmap)  # num_docs + 1 rows: never the empty shape _new_npy writes at once
    offsets.flush()
    del offsets
    fsync_file(folder / DOC_OFFSETS)
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
        fsync_file(path)
        arrays.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
    shards = [dict(shard) for info in infos for shard in info["shards"]]
    for j, shard in enumerate(shards):  # the split's shards in stream order: tokens-00000.bin, tokens-00001.bin, …
        name = f"tokens-{j:05d}.bin"
        if (folder / shard["file"]).exists() or not (folder / name).exists():  # renamed already by a killed join
            os.replace(folder / shard["file"], folder / name)
        shard["file"] = name
    fsync_dir(folder)  # the renames
    info = {
        "num_tokens": int(token_starts[-1]),
        "num_docs": num_docs,
        "shards": shards,
        "doc_offsets_sha256": sha256(folder / DOC_OFFSETS),
        "arrays": arrays,
    }
    write_json_atomic(folder / JOINED, info)
    _remove_pieces(folder)
    return info


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
