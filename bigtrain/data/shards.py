"""The on-disk format of prepared data: token shards, document offsets and index.json.

A prepared cache folder holds, for each split (`train/`, `validation/`):

- `tokens-00000.bin`, `tokens-00001.bin`, …: the split's documents tokenized, each followed
  by EOS, concatenated into one stream and cut into raw little-endian shards of at most
  `MAX_SHARD_TOKENS` tokens (uint16 when the vocabulary fits, else uint32);
- `doc_offsets.npy`: int64 start of each document in the stream, plus the total at the end;
- per-task arrays (`examples.py`): `labels.npy` (classification: int64 label id per
  document) or `loss_spans.npy` (sft: int64 (S, 2) [start, stop) stream positions of the
  tokens to predict, sorted; every document has at least one, its EOS).

`index.json`, written last, atomically and fsynced (after the files it lists), lists every file with its
size and sha256; a folder without it is not prepared. `dataset.TokenDataset` memmaps one split and serves
the task's samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError
from bigtrain.core.filehash import sha256
from bigtrain.core.fsio import fsync_file, write_atomic

FORMAT_VERSION = 1
INDEX = "index.json"
DOC_OFFSETS = "doc_offsets.npy"
MAX_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard



def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# --------------------------------------------------------------------------- writing


class SplitWriter:
    """Append documents to one split folder; `finish()` returns its index.json entry, every file it wrote fsynced
    (so a marker written next vouches for bytes that survive a power loss).

    arrays: {name: empty array} of the per-task arrays to write as `<name>.npy` (an empty
    split still gets each file); rows come with `add_documents`.
    """

    def __init__(
        self, folder: Path, dtype: np.dtype, max_shard_tokens: int | None = None, *, arrays: dict[str, np.ndarray] | None = None,
        prefix: str = "",
    ):
        self.folder = folder
        self.prefix = prefix  # of every file name it writes (a piece of a split: "piece-00003-")
        self.dtype = np.dtype(dtype)
        self.max_shard_tokens = max_shard_tokens or MAX_SHARD_TOKENS
        self.doc_lengths: list[np.ndarray] = []
        self.arrays: dict[str, list[np.ndarray]] = {name: [empty] for name, empty in (arrays or {}).items()}
        self.num_tokens = 0  # written so far: stream position of the next document
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None  # the open shard's
        self._hash = hashlib.sha256()  # the open shard's (each _open_shard starts a new one)
        self._shard_tokens = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, arrays: dict[str, np.ndarray] | None = None) -> None:
        """tokens: the documents concatenated (EOS included); lengths: tokens per document; arrays: rows to append."""
        assert tokens.size == lengths.sum(), "lengths must add up to the tokens given"
        assert set(arrays or {}) == set(self.arrays), "every per-task array gets rows with each batch"
        self.doc_lengths.append(np.asarray(lengths, dtype=np.int64))
        for name, rows in (arrays or {}).items():
            self.arrays[name].append(np.asarray(rows))
        self.num_tokens += int(tokens.size)
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open_shard()
            assert self._file is not None  # _open_shard opened it
            take = min(tokens.size, self.max_shard_tokens - self._shard_tokens)
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._shard_tokens += take
            tokens = tokens[take:]
            if self._shard_tokens == self.max_shard_tokens:
                self._close_shard()

    def finish(self) -> dict:
        self._close_shard()
        lengths = np.concatenate(self.doc_lengths) if self.doc_lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(self.folder / f"{self.prefix}{DOC_OFFSETS}", offsets)
        fsync_file(self.folder / f"{self.prefix}{DOC_OFFSETS}")
        arrays = []
        for name, parts in self.arrays.items():
            path = self.folder / f"{self.prefix}{name}.npy"
            np.save(path, np.concatenate(parts))
            fsync_file(path)
            arrays.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
        return {
            "num_tokens": int(offsets[-1]),
            "num_docs": int(lengths.size),
            "shards": self.shards,
            "doc_offsets_sha256": sha256(self.folder / f"{self.prefix}{DOC_OFFSETS}"),
            "arrays": arrays,
        }

    def _open_shard(self) -> None:
        name = f"{self.prefix}tokens-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._hash = hashlib.sha256()
        self._shard_tokens = 0
        self.shards.append({"file": name})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(num_tokens=self._shard_tokens, sha256=self._hash.hexdigest())
        self._file = None


def write_json_atomic(path: Path, obj: dict) -> None:
    """`obj` as indented JSON, written atomically and fsynced (`fsio.write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- reading


def read_index(cache_path: Path) -> dict | None:
    """The parsed index.json of a prepared folder, or None when it is not prepared."""
    path = cache_path / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"corrupted index {path}: {e} — {_fix_hint(cache_path)}") from None
    if index.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {index.get('version')}, expected {FORMAT_VERSION} — {_fix_hint(cache_path)}")
    return index


def verify_split(cache_path: Path, split: str, info: dict, dtype: np.dtype, *, checksums: bool) -> None:
    """Check every shard of a split is present and the right size; with checksums, its sha256 too."""
    folder = cache_path / split
    for shard in info["shards"]:
        path = safe_load.inside(folder, shard["file"], where=cache_path / INDEX)
        expected = shard["num_tokens"] * np.dtype(dtype).itemsize
        try:
            size = path.stat().st_size
        except OSError:
            raise UserError(f"missing shard {path} — {_fix_hint(cache_path)}") from None
        if size != expected:
            raise UserError(f"corrupted shard {path}: {size} bytes, expected {expected} — {_fix_hint(cache_path)}")
        if checksums:
            _check_sha256(path, shard["sha256"], cache_path, what="shard")
    offsets = folder / DOC_OFFSETS
    if not offsets.exists():
        raise UserError(f"missing {offsets} — {_fix_hint(cache_path)}")
    if checksums:
        _check_sha256(offsets, info["doc_offsets_sha256"], cache_path, what="document offsets")
    for array in info.get("arrays", []):
        path = safe_load.inside(folder, array["file"], where=cache_path / INDEX)
        what = path.stem.replace("_", " ")  # "labels", "loss spans"
        try:
            size = path.stat().st_size
        except OSError:
            raise UserError(f"missing {what} file {path} — {_fix_hint(cache_path)}") from None
        if size != array["bytes"]:
            raise UserError(f"corrupted {what} file {path}: {size} bytes, expected {array['bytes']} — {_fix_hint(cache_path)}")
        if checksums:
            _check_sha256(path, array["sha256"], cache_path, what=f"{what} file")


def _check_sha256(path: Path, expected: str, cache_path: Path, *, what: str) -> None:
    got = sha256(path)
    if got != expected:
        raise UserError(
            f"corrupted {what} {path}: sha256 mismatch (expected {expected}, got {got}) — {_fix_hint(cache_path)}"
        )


def _fix_hint(cache_path: Path) -> str:
    return f"delete {cache_path} and run 'bigtrain prepare RECIPE'"

