"""Where documents come from: resolve `data.source` and load it as train/validation splits.

Every source goes through Hugging Face `datasets` and ends as two `datasets.Dataset`s
with one document (or example) per row, holding the columns the task reads:

- `python-stdlib`: every `.py` file of this interpreter's standard library (no
  site-packages), sorted by relative path — a small real corpus that needs no download;
- `python-stdlib-docstrings`: one row per documented function of those files, with
  text/label/prompt/response/path columns for every task (see `docstrings.py`);
- a local `.txt`/`.text`, `.json`/`.jsonl`, `.parquet` or `.csv` file, or a folder of
  files with one of those extensions;
- a `save_to_disk` folder (`datasets.load_from_disk`);
- otherwise a hub dataset name (`datasets.load_dataset(name, name=data.subset)`).

When the source has no validation split, `data.validation_split` of the documents are held
out by a stable hash of each document's key (its file's path for the python-stdlib sources,
else its row index), so the split never depends on random state, order of loading or the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from bigtrain.data.docstrings import COLUMNS as DOCSTRING_COLUMNS
from bigtrain.data.docstrings import docstring_files, docstring_rows
from bigtrain.data.examples import check_columns
from bigtrain.core.errors import UserError

if TYPE_CHECKING:
    import datasets

STDLIB = "python-stdlib"
STDLIB_DOCSTRINGS = "python-stdlib-docstrings"

# File suffix -> `datasets` packaged builder.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# Any of these in a folder marks it as written by `Dataset(Dict).save_to_disk`.
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Source:
    """A resolved `data.source`: how to load it, and an identity string for cache keys."""

    kind: str  # "stdlib" | "docstrings" | "files" | "disk" | "hub"
    identity: str  # changes whenever the documents may have changed
    files: tuple[Path, ...] = ()  # the files to read ("stdlib", "files")
    builder: str | None = None  # the `datasets` builder ("files")
    root: Path | None = None  # stdlib folder or save_to_disk folder


@dataclass
class DocumentSplits:
    train: "datasets.Dataset"
    validation: "datasets.Dataset"


def resolve_source(cfg) -> Source:
    """Find out what `cfg.source` names (cheap: stats files, reads none). Its identity includes
    data.split and, for the hub, data.revision when they are set."""
    found = _resolve_source(cfg)
    if cfg.revision and found.kind != "hub":
        raise UserError(f"data.revision is for hub datasets, but data.source '{cfg.source}' is local — remove it")
    extra = "".join(f"#{key}={value}" for key, value in (("split", cfg.split), ("revision", cfg.revision)) if value)
    return dataclasses.replace(found, identity=found.identity + extra) if extra else found


def _resolve_source(cfg) -> Source:
    source = cfg.source
    if source in (STDLIB, STDLIB_DOCSTRINGS):
        root = Path(sysconfig.get_paths()["stdlib"])
        version = ".".join(map(str, sys.version_info[:3]))
        kind = "stdlib" if source == STDLIB else "docstrings"
        return Source(kind, f"{source}:{version}:{root}", root=root)  # files listed when loaded

    path = Path(source).expanduser()
    if not path.exists():
        looks_local = source.startswith(("/", "./", "../", "~")) or path.suffix.lower() in BUILDERS
        if looks_local:
            raise UserError(f"data.source: no such file or folder '{source}'")
        return Source("hub", f"hub:{source}:{cfg.subset}")

    path = path.resolve()
    if path.is_dir() and any((path / marker).exists() for marker in _SAVED_MARKERS):
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
        return Source("disk", _files_identity("disk", files), files=files, root=path)
    files = _data_files(path, source)
    builder = BUILDERS[files[0].suffix.lower()]
    return Source("files", _files_identity(builder, files), files=files, builder=builder)


def load_documents(
    cfg, source: Source, *, cache_dir: Path, num_proc: int | None = None, task: str = "causal_lm"
) -> DocumentSplits:
    """Load the source and return its train and validation documents.

    `max_documents` keeps the first N documents of each split (for the python-stdlib
    sources: the first N files, sorted by path) before the validation split is drawn.
    The columns `task` reads are checked to exist.
    """
    by_file = source.kind in ("stdlib", "docstrings")
    if by_file:
        splits = {"train": _load_stdlib(source, cfg.max_documents)}
    elif source.kind == "disk":
        assert source.root is not None  # a "disk" source is its save_to_disk folder
        splits = _as_dict(_load_from_disk(source.root, cfg.source))
    else:
        splits = _as_dict(_load_dataset(cfg, source, cache_dir=cache_dir, num_proc=num_proc))

    limit = None if by_file else cfg.max_documents  # files were limited already
    train_name = _train_split(cfg, splits)
    val_name = next((n for n in ("validation", "test") if n in splits and n != train_name), None)
    train = _take(splits[train_name], limit)
    check_columns(train, cfg, task, cfg.source)
    if val_name is not None:
        validation = _take(splits[val_name], limit)
        check_columns(validation, cfg, task, cfg.source)
        return DocumentSplits(train, validation)

    val_rows: list | np.ndarray  # row indices: ints (an int array when split by index)
    train_rows: list | np.ndarray
    if by_file:  # every row of a file on the same side
        paths = list(train["path"])
        files = sorted(set(paths))
        held = {files[i] for i in held_out_rows(files, cfg.validation_split)}
        val_rows = [i for i, path in enumerate(paths) if path in held]
        val_set = set(val_rows)
        train_rows = [i for i in range(len(train)) if i not in val_set]
    else:
        held_mask = held_out_by_index(len(train), cfg.validation_split)
        val_rows, train_rows = np.flatnonzero(held_mask), np.flatnonzero(~held_mask)
    if source.kind == "docstrings":  # a family the split left without training rows is dropped
        labels = list(train["label"])
        trained = {labels[i] for i in train_rows}
        val_rows = [i for i in val_rows if labels[i] in trained]
    return DocumentSplits(train.select(train_rows), train.select(val_rows))


@dataclass
class DocumentStreams:
    """data.streaming: the source read as it comes (`datasets` IterableDatasets), never whole in memory or
    converted to Arrow on disk. validation: the source's own validation split, or None: held out of train by the
    same stable hash of each row's index as `held_out_rows` (without its tiny-corpus fallbacks, which need
    every key at once)."""

    train: object
    validation: object | None
    fraction: float

    def held_out(self, first_row: int, count: int) -> "np.ndarray":
        """Which of rows first_row .. first_row + count - 1 go to validation (a bool array)."""
        if self.validation is not None or self.fraction <= 0:
            return np.zeros(count, dtype=bool)
        return row_hash(np.arange(first_row, first_row + count, dtype=np.uint64)) < self.fraction


def stream_documents(cfg, source: Source, *, cache_dir: Path) -> DocumentStreams:
    """The train (and validation) documents of a local-files or hub source as streams (`max_documents`: the
    first N of each split)."""
    import datasets

    if source.kind not in ("files", "hub"):
        raise UserError(f"data.streaming reads local data files or hub datasets; '{cfg.source}' is neither — "
                        f"remove data.streaming")
    try:
        with _no_progress_bars():
            if source.kind == "files":
                loaded = datasets.load_dataset(source.builder, data_files=[str(p) for p in source.files],
                                               cache_dir=str(cache_dir / "hf-datasets"), streaming=True)
            else:
                loaded = datasets.load_dataset(cfg.source, name=cfg.subset, revision=cfg.revision,
                                               cache_dir=str(cache_dir / "hf-datasets"), streaming=True)
    except Exception as e:
        raise UserError(f"data.source: cannot stream '{cfg.source}': {_first_line(e)}") from None
    splits = _as_dict(loaded)
    train_name = _train_split(cfg, splits)
    val_name = next((n for n in ("validation", "test") if n in splits and n != train_name), None)
    take = (lambda ds: ds.take(cfg.max_documents)) if cfg.max_documents is not None else (lambda ds: ds)
    return DocumentStreams(take(splits[train_name]), take(splits[val_name]) if val_name else None,
                           cfg.validation_split)


def _train_split(cfg, splits: dict) -> str:
    """data.split, else "train", else the only split; several splits and none named train: a UserError."""
    names = ", ".join(splits)
    if cfg.split is not None:
        if cfg.split not in splits:
            raise UserError(f"data.split: no split '{cfg.split}' in '{cfg.source}' (splits: {names})")
        return cfg.split
    if "train" in splits or len(splits) == 1:
        return "train" if "train" in splits else next(iter(splits))
    raise UserError(f"data.source: '{cfg.source}' has no 'train' split (splits: {names}) — set data.split")


def held_out_rows(keys: list[str], fraction: float) -> list[int]:
    """Rows whose key hashes into the first `fraction` of [0, 1) — a stable, order-free split.

    With fraction > 0 and at least two documents, at least one is held out (the one with
    the smallest hash), so a tiny corpus still gets a validation set.
    """
    if fraction <= 0 or len(keys) < 2:
        return []
    points = [_unit_hash(key) for key in keys]
    rows = [i for i, x in enumerate(points) if x < fraction]
    if not rows:
        rows = [min(range(len(keys)), key=points.__getitem__)]
    if len(rows) == len(keys):  # keep at least one training document
        rows.remove(max(rows, key=points.__getitem__))
    return rows


def held_out_by_index(n: int, fraction: float, chunk: int = 1 << 22) -> "np.ndarray":
    """`held_out_rows` for the row indices 0 .. n-1 without a key per row: a bool array, computed a chunk at a time
    by `row_hash` (8 bytes per row at most in flight beyond the result), with the same tiny-corpus fallbacks."""
    held = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return held
    low = (2.0, 0)  # (hash, row) of the smallest and the largest hash, for the fallbacks
    high = (-1.0, 0)
    for start in range(0, n, chunk):
        points = row_hash(np.arange(start, min(n, start + chunk), dtype=np.uint64))
        held[start:start + len(points)] = points < fraction
        i, j = int(points.argmin()), int(points.argmax())
        low = min(low, (float(points[i]), start + i))
        high = max(high, (float(points[j]), start + j))
    if not held.any():
        held[low[1]] = True
    elif held.all():  # keep at least one training document
        held[high[1]] = False
    return held


def row_hash(rows: "np.ndarray") -> "np.ndarray":
    """A stable point in [0, 1) for each row index (uint64 array): splitmix64's finaliser, the top 53 bits."""
    z = rows + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def stable_hash(*parts) -> str:
    """A short hex key for cache folders: the same parts give the same key on any machine."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------- local paths


def _stdlib_files(root: Path) -> tuple[Path, ...]:
    skip = {"site-packages", "dist-packages"}
    files = (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _data_files(path: Path, source: str) -> tuple[Path, ...]:
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise UserError(f"data.source: '{source}' is not a {_suffix_list()} file")
        return (path,)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS and not p.name.startswith("."))
    if not files:
        raise UserError(f"data.source: folder '{source}' has no {_suffix_list()} files")
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        suffixes = ", ".join(sorted({p.suffix.lower() for p in files}))
        raise UserError(f"data.source: folder '{source}' mixes {suffixes} files — keep one format per folder")
    return tuple(files)


def _files_identity(kind: str, files: tuple[Path, ...]) -> str:
    parts = [kind] + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return "|".join(parts)


def _suffix_list() -> str:
    return "/".join(BUILDERS)


# --------------------------------------------------------------------------- loading


def _load_stdlib(source: Source, max_documents: int | None) -> "datasets.Dataset":
    """python-stdlib: one row per file; python-stdlib-docstrings: one row per documented function."""
    import datasets

    root = source.root
    assert root is not None  # a stdlib source's folder
    files: Sequence[Path] = _stdlib_files(root)
    if source.kind == "docstrings":
        files = docstring_files(files, root)[:max_documents]
        features = datasets.Features({column: datasets.Value("string") for column in DOCSTRING_COLUMNS})
        return datasets.Dataset.from_dict(docstring_rows(files, root), features=features)
    files = files[:max_documents]
    paths = [p.relative_to(root).as_posix() for p in files]
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    return datasets.Dataset.from_dict({"text": texts, "path": paths})


def _load_from_disk(root: Path, source: str):
    import datasets

    try:
        return datasets.load_from_disk(str(root))
    except Exception as e:  # a damaged or foreign folder
        raise UserError(f"data.source: cannot load save_to_disk folder '{source}': {_first_line(e)}") from None


def _load_dataset(cfg, source: Source, *, cache_dir: Path, num_proc: int | None):
    import datasets

    hf_cache = str(cache_dir / "hf-datasets")
    try:
        with _no_progress_bars():  # stderr stays bigtrain's: a user error is one line
            if source.kind == "files":
                files = [str(p) for p in source.files]
                return datasets.load_dataset(source.builder, data_files=files, cache_dir=hf_cache, num_proc=num_proc)
            return datasets.load_dataset(cfg.source, name=cfg.subset, revision=cfg.revision, cache_dir=hf_cache,
                                         num_proc=num_proc)
    except Exception as e:
        if source.kind == "files":
            raise UserError(f"data.source: cannot read '{cfg.source}' as {source.builder}: {_first_line(e)}") from None
        subset = f" (data.subset={cfg.subset})" if cfg.subset else ""
        raise UserError(
            f"data.source: cannot load hub dataset '{cfg.source}'{subset}: {_first_line(e)} "
            "— check the name and your connection, or point data.source at a local file"
        ) from None


@contextmanager
def _no_progress_bars():
    """`datasets` progress bars off for the block, then as they were."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _as_dict(loaded) -> dict:
    """A Dataset or DatasetDict as {split name: Dataset}."""
    return dict(loaded) if hasattr(loaded, "keys") else {"train": loaded}


def _take(ds: "datasets.Dataset", n: int | None) -> "datasets.Dataset":
    return ds.select(range(min(n, len(ds)))) if n is not None and n < len(ds) else ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
