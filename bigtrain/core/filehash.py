"""sha256 of checkpoint files taken while they are written, so a save need not read its files back.

Writers that go through here (`save` for torch.save files, DeepSpeed's checkpoint engine included,
`HashingFileSystem` for DCP's shards and metadata) record each file's size and digest in this process
when the file is closed. The checkpoint manifest (checkpoint/manifest.py: hash_files) takes a recorded digest as long
as the file still has the size, mtime and inode it had when written, and reads back only the files
nobody recorded. Records are per process: each rank knows the files it wrote.

A record may also carry digests of named parts of its file (`record_part`; the manifest's `parts`): "weights", the
model weights inside a file that also holds optimizer state, which `model.init_from` then verifies without reading
the rest. DCP's shards are written in segment mode to make that cheap: DCP asks the stream's position before and
after each item, so each span between two `tell()` calls is one item, hashed on its own as it goes by.
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Record:
    stat_key: tuple[int, int, int]  # size, mtime, inode when written: a file changed since is not trusted
    sha256: str
    segments: dict[tuple[int, int], bytes] | None  # segment mode: (offset, length) -> sha256 of those bytes
    parts: dict[str, str] = field(default_factory=dict)  # part name -> hex sha256 (`record_part`)


WEIGHTS_PART = "weights"  # the part of a file that holds model weights beside optimizer state: what init_from reads
_records: dict[str, _Record] = {}  # absolute path -> what was recorded as it was written
_lock = threading.Lock()  # saves write from background threads


def _stat_key(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ino


class HashingFile:
    """A file opened for binary writing that hashes its bytes as they go (sequential writes only: torch.save
    and DCP write so); the digest is recorded when it is closed without an error. With `segments`, each non-empty
    span between two `tell()` calls is also hashed on its own (`segments(path)`): that costs a second sha256 pass
    over the bytes, in exchange for verifying a part of the file later without reading the rest."""

    def __init__(self, path: str | os.PathLike, segments: bool = False):
        self.path = os.path.abspath(path)
        self._file = open(self.path, "wb")
        self._digest = hashlib.sha256()
        self._segments: dict[tuple[int, int], bytes] | None = {} if segments else None
        self._segment_start, self._segment = 0, hashlib.sha256()

    def write(self, data) -> int:
        written = self._file.write(data)
        self._digest.update(data)
        if self._segments is not None:
            self._segment.update(data)
        return written

    def tell(self) -> int:
        position = self._file.tell()
        if self._segments is not None and position > self._segment_start:
            self._segments[(self._segment_start, position - self._segment_start)] = self._segment.digest()
            self._segment_start, self._segment = position, hashlib.sha256()
        return position

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self, record: bool = True) -> None:
        if self._file.closed:
            return
        self._file.close()
        if record:
            with _lock:
                _records[self.path] = _Record(_stat_key(self.path), self._digest.hexdigest(), self._segments)

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(record=kind is None)


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path), hashing the bytes on their way out."""
    import torch

    with HashingFile(path) as f:
        # torch.save writes to any object with write/flush; its hint asks for a str, a path or an IO[bytes]
        torch.save(obj, f)  # type: ignore[arg-type]


def _current(path: str | os.PathLike) -> _Record | None:
    """This process's record of `path`, if the file is still the one written."""
    path = os.path.abspath(path)
    with _lock:
        record = _records.get(path)
    if record is None:
        return None
    try:
        return record if _stat_key(path) == record.stat_key else None
    except OSError:
        return None


def known(path: str | os.PathLike) -> dict | None:
    """{bytes, sha256} recorded for `path` by this process (and {"parts": {name: sha256}} when parts were recorded),
    if the file is still the one written; else None. The manifest entry of the file, as it is."""
    record = _current(path)
    if record is None:
        return None
    entry = {"bytes": record.stat_key[0], "sha256": record.sha256}
    return {**entry, "parts": dict(record.parts)} if record.parts else entry


def segments(path: str | os.PathLike) -> dict[tuple[int, int], bytes]:
    """{(offset, length): sha256 digest} of the spans of `path` written in segment mode by this process (empty when
    it was not, or the file changed since)."""
    record = _current(path)
    return dict(record.segments or {}) if record is not None else {}


def record_part(path: str | os.PathLike, name: str, sha256: str) -> None:
    """Record `sha256` (hex) as the digest of part `name` of `path`, a file this process wrote and recorded: the
    manifest then carries it (`known`)."""
    record = _current(path)
    if record is None:
        raise RuntimeError(f"no record of {path} as written by this process")  # an internal error: a bug
    with _lock:
        record.parts[name] = sha256


def written(folder: str | os.PathLike) -> list[str]:
    """Absolute paths of the files under `folder` this process wrote and recorded, still as written (sorted)."""
    prefix = os.path.join(os.path.abspath(folder), "")
    with _lock:
        paths = sorted(p for p in _records if p.startswith(prefix))
    return [p for p in paths if known(p) is not None]


def forget(folder: str | os.PathLike) -> None:
    """Drop the records of files under `folder` (once its manifest is written, or the save abandoned)."""
    prefix = os.path.join(os.path.abspath(folder), "")
    with _lock:
        for path in [p for p in _records if p.startswith(prefix)]:
            del _records[path]


def hashing_filesystem(segments: bool = False):
    """A DCP FileSystem whose written files are hashed as they are written (a writer's `fs`); `segments`: each
    item DCP writes hashed on its own too (`HashingFile`)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path, mode: str):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with HashingFile(path, segments=segments) as stream:
                yield stream

        def rename(self, path, new_path) -> None:  # DCP writes .metadata.tmp, then renames it
            super().rename(path, new_path)
            old, new = os.path.abspath(path), os.path.abspath(new_path)
            with _lock:
                if old in _records:
                    _records[new] = _records.pop(old)

    return HashingFileSystem()


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read back in 4 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def range_digests(path: str | os.PathLike, spans: list[tuple[int, int]]):
    """sha256 digest of each (offset, length) range of `path`, read in 4 MB pieces. Without the kernel's readahead,
    which would read on past each range into bytes nobody asked for (8 MB on the disk this was measured on)."""
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for offset, length in spans:
            f.seek(offset)
            digest = hashlib.sha256()
            while length > 0 and (chunk := f.read(min(length, 1 << 22))):
                digest.update(chunk)
                length -= len(chunk)
            yield digest.digest()


def file_entry(path: Path) -> dict:
    """{bytes, sha256} of `path`: the digest recorded as it was written when there is one, else read back."""
    return known(path) or {"bytes": path.stat().st_size, "sha256": sha256(path)}
