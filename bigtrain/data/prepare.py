"""Prepare and open the token cache: documents → tokenizer → EOS-separated token shards, once.

`prepare_data` runs once per (source, split, task and the columns it reads, tokenizer,
seq_len) — `bigtrain prepare` calls it on one process — and writes `cache_dir/<key>/`; every
rank then calls `load_prepared` with the same task, which only memmaps and verifies. What
an example is for each task is in `examples.py`; what a sample is, in `dataset.py`. The
folder is built beside its final place and renamed into it whole, with index.json written
last, so an interrupted prepare never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
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
from bigtrain.data.shards import FORMAT_VERSION, INDEX, SplitWriter, read_index, token_dtype, verify_split, write_json_atomic
from bigtrain.data.sources import Source, load_documents, resolve_source, stable_hash
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
_LOG_EVERY_S = 30.0


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
    """The folder `prepare_data(cfg, task=task)` writes. Cheap: it stats source files and trains nothing."""
    check_task(task)
    source = resolve_source(cfg)
    return _cache_root(cfg) / _data_key(cfg, source, task)


def prepare_data(
    cfg, *, task: str = "causal_lm", num_proc: int | None = None, log: Callable[[str], None] = print
) -> PreparedData:
    """Tokenize `cfg`'s documents for `task` into the cache (if not there yet) and open it.

    task: causal_lm | masked_lm | classification | sft (the run passes cfg.task.name).
    num_proc: processes `datasets` may use to read local files or hub data.
    """
    check_task(task)
    check_seq_len(cfg, task)
    source = resolve_source(cfg)
    root = _cache_root(cfg)
    path = root / _data_key(cfg, source, task)
    if read_index(path) is not None:
        log(f"data: already prepared at {path}")
        return _open_prepared(cfg, path, task=task, verify=False)
    if cfg.tokenizer is not None:  # a missing mask token is known before any document is read
        require_mask(find_special_ids(load_tokenizer_file(cfg.tokenizer, where="data.tokenizer")), cfg, task)

    docs = load_documents(cfg, source, cache_dir=root, num_proc=num_proc, task=task)
    log(f"data: {len(docs.train)} train and {len(docs.validation)} validation documents from '{cfg.source}'")
    labels = None
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

    tmp = root / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        label_ids = {label: i for i, label in enumerate(labels or [])}
        splits = {}
        for name, split_docs in zip(SPLITS, (docs.train, docs.validation)):
            splits[name] = _tokenize_split(split_docs, cfg, task, tok, ids, tmp / name, dtype, name, log, label_ids)
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
        write_json_atomic(tmp / INDEX, index)  # last: it marks the folder complete
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    data = _open_prepared(cfg, path, task=task, verify=False)
    log(
        f"data: prepared {path} — train {data.train.num_tokens:,} tokens ({len(data.train):,} samples), "
        f"validation {data.validation.num_tokens:,} tokens ({len(data.validation):,} samples), dtype {dtype.name}"
    )
    return data


VERIFIED = "verified.json"


def load_prepared(cfg, *, task: str = "causal_lm", verify: bool = True) -> PreparedData:
    """Open the cache `prepare_data(cfg, task=task)` wrote. File sizes are always checked; verify=True adds sha256."""
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


def _tokenize_split(
    docs: "datasets.Dataset",
    cfg,
    task: str,
    tok,
    ids: SpecialIds,
    folder: Path,
    dtype: np.dtype,
    name: str,
    log: Callable,
    label_ids: dict,
) -> dict:
    """Encode examples in batches (the tokenizer's Rust thread pool runs each batch in parallel)."""
    writer = SplitWriter(folder, dtype, arrays=TASK_ARRAYS.get(task))
    t0 = last_log = time.perf_counter()
    done = 0
    columns = list(task_columns(cfg, task).values())
    for batch in docs.select_columns(columns).iter(batch_size=_ENCODE_BATCH_DOCS):
        encoded = encode_batch(batch, cfg, task, tok, ids, label_ids=label_ids)
        examples = encoded.examples  # each without its EOS
        lengths = np.fromiter((len(x) + 1 for x in examples), dtype=np.int64, count=len(examples))  # + EOS
        is_eos = np.zeros(int(lengths.sum()), dtype=bool)
        is_eos[np.cumsum(lengths) - 1] = True
        tokens = np.empty(is_eos.size, dtype=dtype)
        tokens[is_eos] = ids.eos
        tokens[~is_eos] = np.fromiter(itertools.chain.from_iterable(examples), dtype=dtype, count=is_eos.size - len(examples))
        arrays = {k: v + writer.num_tokens if k in POSITION_ARRAYS else v for k, v in encoded.arrays.items()}
        writer.add_documents(tokens, lengths, arrays)
        done += len(examples)
        if time.perf_counter() - last_log > _LOG_EVERY_S:
            last_log = time.perf_counter()
            log(f"data: {name}: tokenized {done:,}/{len(docs):,} documents")
    info = writer.finish()
    seconds = time.perf_counter() - t0
    log(f"data: {name}: {info['num_tokens']:,} tokens from {info['num_docs']:,} documents in {seconds:.1f}s")
    return info


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
    )


def _cache_root(cfg) -> Path:
    return Path(cfg.cache_dir).expanduser()
