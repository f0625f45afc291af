"""The on-disk format of prepared data: token shards, document offsets and index.json.

A prepared cache folder holds, for each split (`train/`, `validation/`):

- `tokens-00000.bin`, `tokens-00001.bin`, …: the split's documents tokenized, each followed
  by EOS, concatenated into one stream and cut into raw little-endian shards of at most
  `MAX_SHARD_TOKENS` tokens (uint16 when the vocabulary fits, else uint32);
- `doc_offsets.npy`: int64 start of each document in the stream, plus the total at the end.

`index.json`, written last and atomically, lists every file with its size in tokens and
sha256; a folder without it is not prepared. `TokenDataset` memmaps one split and serves
fixed-length windows (packing) or single documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bigtrain.errors import UserError

FORMAT_VERSION = 1
INDEX = "index.json"
DOC_OFFSETS = "doc_offsets.npy"
MAX_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard

_HASH_CHUNK_BYTES = 1 << 23


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# --------------------------------------------------------------------------- writing


class SplitWriter:
    """Append documents to one split folder; `finish()` returns its index.json entry."""

    def __init__(self, folder: Path, dtype: np.dtype, max_shard_tokens: int | None = None):
        self.folder = folder
        self.dtype = np.dtype(dtype)
        self.max_shard_tokens = max_shard_tokens or MAX_SHARD_TOKENS
        self.doc_lengths: list[np.ndarray] = []
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._shard_tokens = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: the documents concatenated (EOS included); lengths: tokens per document."""
        assert tokens.size == lengths.sum(), "lengths must add up to the tokens given"
        self.doc_lengths.append(np.asarray(lengths, dtype=np.int64))
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open_shard()
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
        np.save(self.folder / DOC_OFFSETS, offsets)
        return {
            "num_tokens": int(offsets[-1]),
            "num_docs": int(lengths.size),
            "shards": self.shards,
            "doc_offsets_sha256": _sha256(self.folder / DOC_OFFSETS),
        }

    def _open_shard(self) -> None:
        name = f"tokens-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self._hash = hashlib.sha256()
        self._shard_tokens = 0
        self.shards.append({"file": name})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self.shards[-1].update(num_tokens=self._shard_tokens, sha256=self._hash.hexdigest())
        self._file = None


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temporary file, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
        path = folder / shard["file"]
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


def _check_sha256(path: Path, expected: str, cache_path: Path, *, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise UserError(
            f"corrupted {what} {path}: sha256 mismatch (expected {expected}, got {got}) — {_fix_hint(cache_path)}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(cache_path: Path) -> str:
    return f"delete {cache_path} and run 'bigtrain prepare RECIPE'"


class TokenDataset:
    """One split of prepared tokens, memmapped; samples are int64 arrays.

    packing=True: sample i is the window tokens[i*seq_len : i*seq_len + seq_len + 1] of the
    split's token stream (inputs are [:-1], targets [1:]; consecutive windows share one
    token), so there are (num_tokens - 1) // seq_len samples. A window may cross shards.
    packing=False: sample i is the i-th document with at least 2 tokens (EOS included),
    truncated to seq_len + 1 tokens; the task's collate pads.
    """

    def __init__(self, folder: Path, info: dict, dtype: np.dtype, *, seq_len: int, packing: bool):
        self.folder = folder
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.packing = packing
        self.num_tokens: int = info["num_tokens"]
        self.num_docs: int = info["num_docs"]
        self._files = [folder / shard["file"] for shard in info["shards"]]
        self._shard_starts = np.cumsum([0] + [shard["num_tokens"] for shard in info["shards"]])
        self._shards: list[np.memmap] | None = None  # opened on first read, never pickled
        if packing:
            self._num_samples = max(0, (self.num_tokens - 1) // seq_len)
        else:
            offsets = np.load(folder / DOC_OFFSETS)
            starts, ends = offsets[:-1], offsets[1:]
            keep = ends - starts >= 2
            self._doc_starts = starts[keep]
            self._doc_ends = np.minimum(ends[keep], self._doc_starts + seq_len + 1)
            self._num_samples = int(keep.sum())

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self._num_samples:
            raise IndexError(f"sample {i} out of range for {self._num_samples} samples")
        if self.packing:
            start = i * self.seq_len
            return self.read(start, start + self.seq_len + 1)  # (seq_len + 1,)
        return self.read(int(self._doc_starts[i]), int(self._doc_ends[i]))

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the split's stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        shards = self._open()
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_start, shard_stop = self._shard_starts[k], self._shard_starts[k + 1]
            take = min(stop, shard_stop) - pos
            out[pos - start : pos - start + take] = shards[k][pos - shard_start : pos - shard_start + take]
            pos += take
            k += 1
        return out

    def _open(self) -> list[np.memmap]:
        if self._shards is None:
            sizes = np.diff(self._shard_starts)
            self._shards = [np.memmap(f, dtype=self.dtype, mode="r", shape=(int(n),)) for f, n in zip(self._files, sizes)]
        return self._shards

    def __getstate__(self) -> dict:
        # DataLoader workers reopen the memmaps instead of receiving a copy of the data.
        return {**self.__dict__, "_shards": None}

    def __repr__(self) -> str:
        mode = "packed" if self.packing else "documents"
        return f"TokenDataset({self.folder}, {len(self)} samples, {self.num_tokens} tokens, {mode})"
