"""Prepare and open the token cache: documents → tokenizer → EOS-separated token shards, once.

`prepare_data` runs once per (source, split, tokenizer, seq_len) — `bigtrain prepare` calls
it on one process — and writes `cache_dir/<key>/`; every rank then calls `load_prepared`,
which only memmaps and verifies. The folder is built beside its final place and renamed
into it whole, with index.json written last, so an interrupted prepare never leaves a
cache that looks complete.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bigtrain.data.shards import (
    FORMAT_VERSION,
    INDEX,
    SplitWriter,
    TokenDataset,
    read_index,
    token_dtype,
    verify_split,
    write_json_atomic,
)
from bigtrain.data.sources import Source, load_documents, resolve_source, stable_hash
from bigtrain.data.tokenizer import (
    build_tokenizer,
    load_tokenizer_file,
    special_token_ids,
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
    """A prepared cache, opened: the tokenizer, its special ids, and both splits as samples."""

    path: Path
    tokenizer: "tokenizers.Tokenizer"
    vocab_size: int
    eos_id: int
    pad_id: int
    seq_len: int
    train: TokenDataset
    validation: TokenDataset


def data_cache_path(cfg) -> Path:
    """The folder `prepare_data(cfg)` writes. Cheap: it stats source files and trains nothing."""
    source = resolve_source(cfg)
    return _cache_root(cfg) / _data_key(cfg, source)


def prepare_data(cfg, *, num_proc: int | None = None, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenize and pack `cfg`'s documents into the cache (if not there yet) and open it.

    num_proc: processes `datasets` may use to read local files or hub data.
    """
    source = resolve_source(cfg)
    root = _cache_root(cfg)
    path = root / _data_key(cfg, source)
    if read_index(path) is not None:
        log(f"data: already prepared at {path}")
        return _open_prepared(cfg, path, verify=False)

    docs = load_documents(cfg, source, cache_dir=root, num_proc=num_proc)
    log(f"data: {len(docs.train)} train and {len(docs.validation)} validation documents from '{cfg.source}'")
    tok = build_tokenizer(cfg, source, docs.train, cache_dir=root, log=log)
    tokenizer_file = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else trained_tokenizer_path(cfg, source, root)
    eos_id, pad_id = special_token_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    tmp = root / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        splits = {}
        for name, split_docs in zip(SPLITS, (docs.train, docs.validation)):
            splits[name] = _tokenize_split(split_docs, cfg.text_column, tok, eos_id, tmp / name, dtype, name, log)
        index = {
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "pad_id": pad_id,
            "seq_len": cfg.seq_len,
            "source": cfg.source,
            "text_column": cfg.text_column,
            "tokenizer": tokenizer_identity(cfg, source),
            "splits": splits,
        }
        write_json_atomic(tmp / INDEX, index)  # last: it marks the folder complete
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    data = _open_prepared(cfg, path, verify=False)
    log(
        f"data: prepared {path} — train {data.train.num_tokens:,} tokens ({len(data.train):,} samples), "
        f"validation {data.validation.num_tokens:,} tokens ({len(data.validation):,} samples), dtype {dtype.name}"
    )
    return data


def load_prepared(cfg, *, verify: bool = True) -> PreparedData:
    """Open the cache `prepare_data(cfg)` wrote. Shard sizes are always checked; verify=True adds sha256."""
    return _open_prepared(cfg, data_cache_path(cfg), verify=verify)


def _open_prepared(cfg, path: Path, *, verify: bool) -> PreparedData:
    index = read_index(path)
    if index is None:
        raise UserError(f"data: not prepared (no {path / INDEX}) — run 'bigtrain prepare RECIPE'")
    dtype = np.dtype(index["dtype"])
    for name in SPLITS:
        verify_split(path, name, index["splits"][name], dtype, checksums=verify)
    splits = {
        name: TokenDataset(path / name, index["splits"][name], dtype, seq_len=cfg.seq_len, packing=cfg.packing)
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
    )


def _tokenize_split(
    docs: "datasets.Dataset", column: str, tok, eos_id: int, folder: Path, dtype: np.dtype, name: str, log: Callable
) -> dict:
    """Encode documents in batches (the tokenizer's Rust thread pool runs each batch in parallel)."""
    writer = SplitWriter(folder, dtype)
    t0 = last_log = time.perf_counter()
    done = 0
    for batch in docs.select_columns([column]).iter(batch_size=_ENCODE_BATCH_DOCS):
        texts = [text or "" for text in batch[column]]
        ids = [enc.ids for enc in tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: faster
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))  # + EOS
        is_eos = np.zeros(int(lengths.sum()), dtype=bool)
        is_eos[np.cumsum(lengths) - 1] = True
        tokens = np.empty(is_eos.size, dtype=dtype)
        tokens[is_eos] = eos_id
        tokens[~is_eos] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=is_eos.size - len(ids))
        writer.add_documents(tokens, lengths)
        done += len(ids)
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


def _data_key(cfg, source: Source) -> str:
    return stable_hash(
        f"data-v{FORMAT_VERSION}",
        source.identity,
        cfg.text_column,
        cfg.max_documents,
        cfg.validation_split,
        tokenizer_identity(cfg, source),
        cfg.seq_len,
    )


def _cache_root(cfg) -> Path:
    return Path(cfg.cache_dir).expanduser()
