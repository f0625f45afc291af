"""`bigtrain prepare` killed at each file operation in turn: the next prepare finishes the same cache, byte for byte,
tokenizing only the pieces the killed one had not finished, and nothing needs removing by hand (bigtrain/data/pieces.py,
prepare.py, bigtrain/core/fsio.py).

The kill is a real death: a forked copy of this process runs the prepare with its file operations counted (the
opens for writing, renames, deletes of files under the cache key) and calls os._exit at the Nth. The rerun runs here.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from bigtrain.config import DataConfig
from bigtrain.data import data_cache_path, prepare_data
from bigtrain.data import pieces as pieces_module
from bigtrain.data import prepare as prepare_module

KILLED = 77  # the exit code of a prepare killed at its Nth file operation
DOCS = 30  # 25 train and 5 validation: 2 + 1 pieces of up to 16 documents


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    lines = [l for l in Path(json.__file__).with_name("decoder.py").read_text().splitlines() if l.strip()]
    rows = [{"text": "\n".join(lines[(i * 3) % len(lines):(i * 3) % len(lines) + 1 + i % 4]), "label": "ab"[i % 2]}
            for i in range(DOCS)]
    path = tmp_path_factory.mktemp("corpus") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory) -> str:
    cfg = DataConfig(source=str(corpus), vocab_size=300, seq_len=32, cache_dir=str(tmp_path_factory.mktemp("bpe")))
    return str(prepare_data(cfg, log=quiet).path / "tokenizer.json")


def count_file_operations(key: str, on_operation, patch) -> None:
    """Call on_operation(description) before each open for writing, rename or delete of a path naming `key`
    (the cache folder, its build folder, its lock), patched in with patch(module, name, wrapper)."""
    def counted(module, name: str, paths_of) -> None:
        real = getattr(module, name)

        def operation(*args, **kwargs):
            paths = paths_of(*args, **kwargs)
            if paths is not None and key in paths:
                on_operation(f"{name} {paths}")
            return real(*args, **kwargs)

        patch(module, name, operation)

    for name in ("replace", "rename", "unlink", "remove"):
        counted(os, name, lambda *args, **kwargs: " ".join(str(a) for a in args[:2]))
    counted(shutil, "rmtree", lambda path, *args, **kwargs: str(path))
    for module in (builtins, io):  # np.save, shutil.copyfile / Path.open, Path.write_text
        counted(module, "open", lambda file, mode="r", *args, **kwargs: str(file) if set(mode) & set("wax+") else None)


def killed_prepare(cfg, task: str, kill_at: int) -> int:
    """The exit code of a forked prepare that dies (os._exit) at its `kill_at`-th file operation (0: it finished)."""
    def run() -> None:
        count = [0]

        def operation(_description: str) -> None:
            count[0] += 1
            if count[0] == kill_at:
                os._exit(KILLED)

        count_file_operations(data_cache_path(cfg, task=task).name, operation, setattr)
        prepare_data(cfg, task=task, log=quiet)

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join()
    return child.exitcode


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a forked prepare and a rerun per file operation: ~80 of them
@pytest.mark.parametrize("task,streaming", [("classification", False), ("causal_lm", True)],
                         ids=["classification", "streaming"])
def test_prepare_killed_at_each_file_operation_reruns_to_the_same_bytes(corpus, tokenizer_file, tmp_path, monkeypatch,
                                                                        task, streaming):
    """Killed before its 1st, 2nd, … file operation, a prepare (with per-task arrays; or a stream) is finished by
    the next one: the cache folder holds the uninterrupted prepare's files, byte for byte, no build folder is
    left, and only the pieces whose mark the killed prepare had not written are tokenized (none of a split it
    had joined)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # forked children: no warning about the parent's threads
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # for a power loss, not a kill; ~5 ms each on this disk
    monkeypatch.setattr(pieces_module, "_PIECE_DOCS", (16, 16))
    monkeypatch.setattr(prepare_module, "STREAM_PIECE_DOCS", 16)
    cfg = DataConfig(source=str(corpus), tokenizer=tokenizer_file, seq_len=32, validation_split=0.25,
                     streaming=streaming, cache_dir=str(tmp_path / "reference"))
    key = data_cache_path(cfg, task=task).name

    operations = []  # the uninterrupted prepare's, in order
    with monkeypatch.context() as recording:
        count_file_operations(key, operations.append, recording.setattr)
        reference = files(prepare_data(cfg, task=task, log=quiet).path)
    piece_marks = [i for i, op in enumerate(operations) if op.startswith("replace ") and
                   Path(op.split()[-1]).name.startswith("piece-") and op.endswith(".json")]
    assert len(piece_marks) == 3  # 2 + 1 pieces
    assert not [name for name in reference if "piece-" in name or name.endswith(("plan.json", "joined.json"))]

    killed = dataclasses.replace(cfg, cache_dir=str(tmp_path / "killed"))
    root, tokenized = Path(killed.cache_dir), []
    tokenize_piece = pieces_module._tokenize_piece  # the rerun's: it runs in this process (one worker)
    monkeypatch.setattr(pieces_module, "_tokenize_piece", lambda k, *args: tokenized.append(k) or tokenize_piece(k, *args))
    for kill_at in range(1, len(operations) + 1):
        shutil.rmtree(root / key, ignore_errors=True)
        shutil.rmtree(root / f".tmp-{key}", ignore_errors=True)
        assert killed_prepare(killed, task, kill_at) == KILLED, f"not killed at {operations[kill_at - 1]}"
        tokenized.clear()
        data = prepare_data(killed, task=task, log=quiet)
        where = f"killed at operation {kill_at}: {operations[kill_at - 1]}"
        assert files(data.path) == reference, where
        assert not list(root.glob(".tmp-*")), where
        finished = sum(i < kill_at - 1 for i in piece_marks)  # pieces whose mark was written before the kill
        assert len(tokenized) == len(piece_marks) - finished, where  # nothing finished is tokenized again
    shutil.rmtree(root / key)
    assert killed_prepare(killed, task, len(operations) + 1) == 0  # an uninterrupted prepare has no more operations
