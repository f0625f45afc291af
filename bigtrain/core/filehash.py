"""sha256 of checkpoint files taken while they are written, so a save need not read its files back.

Writers that go through here (`save` for torch.save files, DeepSpeed's checkpoint engine included,
`HashingFileSystem` for DCP's shards and metadata) record each file's size and digest in this process
when the file is closed. The checkpoint manifest (checkpoint.hash_files) takes a recorded digest as long
as the file still has the size, mtime and inode it had when written, and reads back only the files
nobody recorded. Records are per process: each rank knows the files it wrote.
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path

_records: dict[str, tuple[tuple[int, int, int], str]] = {}  # absolute path -> (stat key, sha256)
_lock = threading.Lock()  # saves write from background threads


def _stat_key(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns, info.st_ino


class HashingFile:
    """A file opened for binary writing that hashes its bytes as they go (sequential writes only: torch.save
    and DCP write so); the digest is recorded when it is closed without an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(path)
        self._file = open(self.path, "wb")
        self._digest = hashlib.sha256()

    def write(self, data) -> int:
        written = self._file.write(data)
        self._digest.update(data)
        return written

    def tell(self) -> int:
        return self._file.tell()

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
                _records[self.path] = (_stat_key(self.path), self._digest.hexdigest())

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(record=kind is None)


def save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path), hashing the bytes on their way out."""
    import torch

    with HashingFile(path) as f:
        torch.save(obj, f)


def known(path: str | os.PathLike) -> dict | None:
    """{bytes, sha256} recorded for `path` by this process, if the file is still the one written; else None."""
    path = os.path.abspath(path)
    with _lock:
        record = _records.get(path)
    if record is None:
        return None
    try:
        key = _stat_key(path)
    except OSError:
        return None
    return {"bytes": key[0], "sha256": record[1]} if key == record[0] else None


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


def hashing_filesystem():
    """A DCP FileSystem whose written files are hashed as they are written (a writer's `fs`)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path, mode: str):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with HashingFile(path) as stream:
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


def file_entry(path: Path) -> dict:
    """{bytes, sha256} of `path`: the digest recorded as it was written when there is one, else read back."""
    return known(path) or {"bytes": path.stat().st_size, "sha256": sha256(path)}
