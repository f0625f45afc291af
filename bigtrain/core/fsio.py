"""Durable file writes: the one atomic writer and the fsyncs that checkpoints and the data cache rely on.

A file that marks other files complete (a checkpoint's manifest, a prepared cache's index.json, a piece's
marker) is written by `write_atomic`: readers see the old file or the whole new one, never a part, and its
bytes are on disk before the rename. The files it vouches for are fsynced first (`fsync_file`, `fsync_tree`);
a rename only survives a power loss once its folder is fsynced (`fsync_dir`), which callers do after the last
of several renames. A writer killed midway leaves its hidden temporary file behind; `remove_partial_writes`
clears those before a folder is published.
"""

from __future__ import annotations

import os
from pathlib import Path

_PARTIAL = ".tmp-"  # in the temporary name of a write in progress: .<name>.tmp-<pid>


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a hidden temporary file beside it (fsynced, then renamed over `path`). The
    temporary name carries the process id, so processes writing the same file at once never share one."""
    part = path.with_name(f".{path.name}{_PARTIAL}{os.getpid()}")
    with open(part, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def remove_partial_writes(folder: Path) -> None:
    """Delete the temporary files `write_atomic` calls killed midway left anywhere under `folder`."""
    for part in folder.rglob(f".*{_PARTIAL}*"):
        if part.is_file():
            part.unlink(missing_ok=True)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder: the names created, renamed or removed in it so far survive a power loss."""
    fsync_file(path)  # a folder opens read-only like a file


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (so a rename after it publishes data that is on disk)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)
