"""Tests for bigtrain/data: sources, tokenizer, prepared shards, global sampler, eval split (CPU, fast)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import DataConfig, load_config
from bigtrain.data import GlobalSampler, data_cache_path, eval_busiest_count, eval_indices, load_prepared, prepare_data
from bigtrain.data import prepare as prepare_module
from bigtrain.data import shards as shards_module
from bigtrain.data.sampler import IndexPermutation
from bigtrain.data.shards import token_dtype
from bigtrain.data.sources import DocumentStreams, held_out_by_index, held_out_rows, load_documents, resolve_source
from bigtrain.core.errors import UserError

SEQ_LEN = 64


def quiet(_msg: str) -> None:
    pass


def cfg_cache(cfg) -> Path:
    return Path(cfg.cache_dir).expanduser()


def documents(cfg):
    """(train texts, validation texts) exactly as prepare_data sees them."""
    docs = load_documents(cfg, resolve_source(cfg), cache_dir=cfg_cache(cfg))
    return list(docs.train[cfg.text_column]), list(docs.validation[cfg.text_column])


def encode_docs(tokenizer, texts, eos_id):
    return [enc.ids + [eos_id] for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """40 stdlib files, a 512-token BPE, prepared once for the module."""
    cfg = DataConfig(max_documents=40, vocab_size=512, seq_len=SEQ_LEN, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, prepare_data(cfg, log=quiet)


@pytest.fixture(scope="module")
def tokenizer_file(stdlib):
    _, data = stdlib
    return str(data.path / "tokenizer.json")


def copy_cache(cfg, tmp_path):
    """The same prepared cache under a fresh cache_dir, safe to damage."""
    new = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"))
    shutil.copytree(cfg_cache(cfg), new.cache_dir)
    return new


# --------------------------------------------------------------------------- prepare


def test_prepare_is_cached_and_does_not_retokenize(stdlib, monkeypatch):
    cfg, data = stdlib
    index = data.path / "index.json"
    mtime = index.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("documents were loaded again")

    monkeypatch.setattr(prepare_module, "load_documents", fail)
    again = prepare_data(cfg, log=quiet)
    assert again.path == data.path == data_cache_path(cfg)
    assert index.stat().st_mtime_ns == mtime
    assert again.train.num_tokens == data.train.num_tokens
    assert not [p for p in cfg_cache(cfg).iterdir() if p.name.startswith(".tmp")]


def test_index_lists_every_shard_with_checksum(stdlib):
    _, data = stdlib
    index = json.loads((data.path / "index.json").read_text())
    assert index["version"] == 1 and index["seq_len"] == SEQ_LEN and index["vocab_size"] == 512
    assert index["eos_id"] == data.tokenizer.token_to_id("<|endoftext|>")
    assert index["pad_id"] == data.tokenizer.token_to_id("<|pad|>")
    for split in ("train", "validation"):
        info = index["splits"][split]
        assert sum(s["num_tokens"] for s in info["shards"]) == info["num_tokens"]
        offsets = np.load(data.path / split / "doc_offsets.npy")
        assert offsets.dtype == np.int64 and len(offsets) == info["num_docs"] + 1 and offsets[-1] == info["num_tokens"]


def test_small_vocab_uses_uint16_shards(stdlib):
    _, data = stdlib
    index = json.loads((data.path / "index.json").read_text())
    assert index["dtype"] == "uint16"
    shard = index["splits"]["train"]["shards"][0]
    assert (data.path / "train" / shard["file"]).stat().st_size == 2 * shard["num_tokens"]
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(128_256) == np.uint32


def test_stream_is_documents_each_followed_by_eos(stdlib):
    cfg, data = stdlib
    train_texts, val_texts = documents(cfg)
    for texts, split in ((train_texts, data.train), (val_texts, data.validation)):
        expected = np.concatenate([np.array(ids) for ids in encode_docs(data.tokenizer, texts, data.eos_id)])
        np.testing.assert_array_equal(split.read(0, split.num_tokens), expected)
        assert (split.read(0, split.num_tokens) == data.eos_id).sum() == len(texts)


def test_packed_samples_are_overlapping_consecutive_windows(stdlib):
    _, data = stdlib
    train = data.train
    assert len(train) == (train.num_tokens - 1) // SEQ_LEN
    samples = np.stack([train[i] for i in range(len(train))])  # (N, seq_len + 1)
    assert samples.shape == (len(train), SEQ_LEN + 1) and samples.dtype == np.int64
    np.testing.assert_array_equal(samples[:-1, -1], samples[1:, 0])  # last target = next input
    stream = train.read(0, train.num_tokens)
    covered = np.concatenate([samples[:, :-1].reshape(-1), samples[-1, -1:]])
    np.testing.assert_array_equal(covered, stream[: len(covered)])
    assert train.num_tokens - len(covered) < SEQ_LEN  # only a partial last window is left out
    with pytest.raises(IndexError):
        train[len(train)]


def test_unpacked_samples_are_documents_truncated(stdlib):
    cfg, data = stdlib
    docs = load_prepared(dataclasses.replace(cfg, packing=False), verify=False)
    assert docs.path == data.path  # packing is a view, not a different cache
    train_texts, _ = documents(cfg)
    expected = [ids[: SEQ_LEN + 1] for ids in encode_docs(data.tokenizer, train_texts, data.eos_id) if len(ids) >= 2]
    assert len(docs.train) == len(expected)
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(docs.train[i], ids)


def test_shards_split_and_windows_cross_shard_boundaries(stdlib, tokenizer_file, tmp_path, monkeypatch):
    cfg, data = stdlib
    monkeypatch.setattr(shards_module, "MAX_SHARD_TOKENS", 1000)
    small = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"), max_documents=5, tokenizer=tokenizer_file)
    path = data_cache_path(small)  # cheap: derivable before anything is prepared
    assert not path.exists()
    prepared = prepare_data(small, log=quiet)
    assert prepared.path == path
    shard_files = sorted((path / "train").glob("tokens-*.bin"))
    assert len(shard_files) == -(-prepared.train.num_tokens // 1000) >= 3
    whole = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in shard_files]).astype(np.int64)
    for i in range(len(prepared.train)):
        np.testing.assert_array_equal(prepared.train[i], whole[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1])


def split_files(data) -> dict[str, dict[str, np.ndarray]]:
    """Per split: the whole token stream, the document offsets and the per-task arrays of a prepared cache."""
    out = {}
    for name, split in (("train", data.train), ("validation", data.validation)):
        out[name] = {"stream": split.read(0, split.num_tokens)}
        for array in sorted((data.path / name).glob("*.npy")):
            out[name][array.name] = np.load(array)
    return out


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """900 jsonl rows of stdlib source lines with a text, a label, a prompt and a response each."""
    lines = [l for l in Path(json.__file__).with_name("decoder.py").read_text().splitlines() if l.strip()]
    rows = [{"text": "\n".join(lines[i % len(lines):i % len(lines) + 1 + i % 7]), "label": ["a", "b", "c"][i % 3],
             "prompt": lines[i % len(lines)], "response": lines[(i * 7) % len(lines)]} for i in range(900)]
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", ["causal_lm", "sft", "classification"])
def test_prepare_with_two_workers_writes_what_one_process_writes(tokenizer_file, rows_file, tmp_path, task):
    """Pieces tokenized by two forked workers join into the same stream, offsets and task arrays (labels, loss
    spans: stream positions, shifted per piece) as one process's pieces."""
    cfg = DataConfig(source=str(rows_file), tokenizer=tokenizer_file, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "one"),
                     validation_split=0.2)
    one = prepare_data(cfg, task=task, log=quiet)
    messages = []
    two = prepare_data(dataclasses.replace(cfg, cache_dir=str(tmp_path / "two")), task=task, workers=2,
                       log=messages.append)
    assert len(json.loads((two.path / "index.json").read_text())["splits"]["train"]["shards"]) >= 2  # pieces
    assert any("(2 workers)" in m for m in messages)
    a, b = split_files(one), split_files(two)
    assert a.keys() == b.keys() and all(a[s].keys() == b[s].keys() for s in a)
    for split in a:
        for name in a[split]:
            np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split} {name}")
    assert not list((tmp_path / "two").glob(".tmp-*")) and not list((two.path / "train").glob("piece-*.json"))


def test_a_training_start_of_several_processes_prepares_only_small_local_data(tokenizer_file, rows_file, tmp_path):
    from bigtrain.data.prepare import training_prepare_problem

    cfg = DataConfig(source=str(rows_file), tokenizer=tokenizer_file, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "c"))
    size = rows_file.stat().st_size
    problem = lambda **kw: training_prepare_problem(cfg, task="causal_lm", **{"world_size": 2, "under_slurm": False, **kw})  # noqa: E731
    assert problem() is None and problem(limit_bytes=size) is None  # small: rank 0 prepares it while the others wait
    assert problem(world_size=1, under_slurm=True, limit_bytes=1) is None  # one process waits for no one
    assert f"({size / 1e9:.1f} GB of source files (over 1e-06 GB))" in problem(limit_bytes=1000)
    assert "(under Slurm) — run 'bigtrain prepare RECIPE' first" in problem(under_slurm=True)
    prepare_data(cfg, log=quiet)
    assert problem(under_slurm=True, limit_bytes=1) is None  # prepared already


@pytest.mark.slow  # two `bigtrain prepare` processes, one after the other
def test_prepare_killed_midway_keeps_its_finished_pieces(tokenizer_file, tmp_path):
    """`bigtrain prepare` killed (SIGKILL) once its first piece is written: the next prepare keeps the finished
    pieces, tokenizes the rest, and its cache checks out. (That the cache equals an uninterrupted prepare's,
    byte for byte, after a kill at any file operation: test_prepare_resume.py.)"""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, tiny_recipe, write_recipe

    import sysconfig

    lines = [line for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
             for line in f.read_text(errors="replace").splitlines()] * 2
    corpus = tmp_path / "corpus.jsonl"  # ~9 MB in documents of 40 lines: 4 pieces of about a second each
    corpus.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 40])}) + "\n" for i in range(0, len(lines), 40)))
    data = {"source": str(corpus), "tokenizer": tokenizer_file, "seq_len": SEQ_LEN, "max_documents": None}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "cache", tmp_path / "runs", data=data))
    command = [sys.executable, "-m", "bigtrain", "prepare", str(recipe), "--workers", "1"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "cache").glob(".tmp-*/train/piece-*.json")) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, first.stderr.read()
    kept = len(list((tmp_path / "cache").glob(".tmp-*/train/piece-*.json")))
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"data: train: {kept} of 4 pieces kept from an interrupted prepare" in again.stdout
    resumed = load_prepared(load_config(recipe).data, verify=True)  # every file's sha256 as index.json lists it
    assert resumed.train.num_docs == len(corpus.read_text().splitlines()) - resumed.validation.num_docs


def test_token_dataset_pickles_without_its_data(stdlib):
    _, data = stdlib
    data.train[0]  # opens the memmaps
    blob = pickle.dumps(data.train)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob)[5], data.train[5])


# --------------------------------------------------------------------------- validation split


def test_validation_split_by_file_is_deterministic_and_disjoint(stdlib):
    cfg, _ = stdlib
    source = resolve_source(cfg)
    wide = dataclasses.replace(cfg, validation_split=0.25)
    first = load_documents(wide, source, cache_dir=cfg_cache(cfg))
    second = load_documents(wide, source, cache_dir=cfg_cache(cfg))
    train, val = set(first.train["path"]), set(first.validation["path"])
    assert list(first.validation["path"]) == list(second.validation["path"])
    assert train.isdisjoint(val) and len(train | val) == 40 and 0 < len(val) < 40
    # By hash of the path, not by position: more documents keep the old assignment.
    more = load_documents(dataclasses.replace(wide, max_documents=80), source, cache_dir=cfg_cache(cfg))
    assert set(more.validation["path"]) & (train | val) == val


def test_tiny_validation_fraction_still_holds_out_one_document():
    keys = [f"doc{i}" for i in range(40)]
    assert len(held_out_rows(keys, 0.01)) >= 1
    assert held_out_rows(keys, 0.01) == held_out_rows(keys, 0.01)
    assert held_out_rows(keys, 0.0) == []
    assert len(held_out_rows(keys[:2], 0.99)) == 1  # never the whole corpus


def test_held_out_rows_by_index_are_vectorised_chunked_and_match_the_stream():
    """Row-indexed sources (no per-row keys) hold out by a hash of the index computed in numpy chunks: the same
    rows whatever the chunk, the stream's held_out agrees row for row, the share is the fraction, and the
    tiny-corpus fallbacks hold."""
    n = 100_003
    held = held_out_by_index(n, 0.05)
    assert held.dtype == bool and held.shape == (n,)
    assert np.array_equal(held, held_out_by_index(n, 0.05, chunk=4096))
    assert abs(held.mean() - 0.05) < 0.003
    streams = DocumentStreams(train=None, validation=None, fraction=0.05)
    assert np.array_equal(np.concatenate([streams.held_out(a, min(777, n - a)) for a in range(0, n, 777)]), held)
    assert held_out_by_index(n, 0.05)[:5000].tolist() == held_out_by_index(5000, 0.05).tolist()  # prefix-stable
    assert held_out_by_index(40, 0.001).sum() == 1  # at least one held out
    assert held_out_by_index(2, 0.999).sum() == 1  # never the whole corpus
    assert not held_out_by_index(n, 0.0).any() and not held_out_by_index(1, 0.5).any()
    assert not DocumentStreams(train=None, validation=object(), fraction=0.05).held_out(0, 100).any()


# --------------------------------------------------------------------------- local sources

TEXTS = [f"def f{i}(x):\n    return x * {i}  # document {i}" for i in range(30)]
LINES = [f"line {i}: the quick brown fox {i}" for i in range(30)]


def write_source(kind: str, folder):
    """Write TEXTS (or LINES for txt) in the given format; return (source path, expected documents)."""
    import datasets

    if kind == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    elif kind == "jsonl-folder":
        path = folder / "parts"
        path.mkdir()
        for part in range(3):
            rows = TEXTS[part * 10 : (part + 1) * 10]
            (path / f"part-{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    elif kind == "csv":
        path = folder / "docs.csv"
        datasets.Dataset.from_dict({"id": list(range(30)), "text": TEXTS}).to_csv(str(path), index=False)
    elif kind == "parquet":
        path = folder / "docs.parquet"
        datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(path))
    elif kind == "txt":
        path = folder / "docs.txt"
        path.write_text("\n".join(LINES) + "\n")
        return path, LINES
    elif kind == "save_to_disk":
        path = folder / "saved"
        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(path))
    return path, TEXTS


@pytest.mark.parametrize("kind", ["jsonl", "jsonl-folder", "csv", "parquet", "txt", "save_to_disk"])
def test_local_sources_prepare_every_document(kind, tokenizer_file, tmp_path):
    path, texts = write_source(kind, tmp_path)
    cfg = DataConfig(source=str(path), tokenizer=tokenizer_file, seq_len=16, validation_split=0.2, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, log=quiet)
    train_texts, val_texts = documents(cfg)
    assert sorted(train_texts + val_texts) == sorted(texts) and val_texts
    decoded = []
    for split in (data.train, data.validation):
        stream = split.read(0, split.num_tokens).tolist()
        decoded += data.tokenizer.decode(stream, skip_special_tokens=False).split("<|endoftext|>")[:-1]
    assert sorted(decoded) == sorted(texts)


def test_save_to_disk_validation_split_is_used(tokenizer_file, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    splits = {"train": TEXTS[:20], "validation": TEXTS[20:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(saved))
    cfg = DataConfig(source=str(saved), tokenizer=tokenizer_file, cache_dir=str(tmp_path / "c"))
    train_texts, val_texts = documents(cfg)
    assert train_texts == TEXTS[:20] and val_texts == TEXTS[20:]


def test_data_split_picks_the_training_split_and_is_part_of_the_cache_key(tokenizer_file, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    splits = {"train_sft": TEXTS[:20], "test_sft": TEXTS[20:25], "train_gen": TEXTS[25:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(saved))
    cfg = DataConfig(source=str(saved), tokenizer=tokenizer_file, validation_split=0.0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"^data.source: '.*saved' has no 'train' split \(splits: train_sft, test_sft, "
                                        r"train_gen\) — set data.split$"):
        documents(cfg)
    with pytest.raises(UserError, match=r"^data.split: no split 'train' in '.*saved' \(splits: train_sft, test_sft"):
        documents(dataclasses.replace(cfg, split="train"))
    assert documents(dataclasses.replace(cfg, split="train_gen"))[0] == TEXTS[25:]
    assert documents(dataclasses.replace(cfg, split="train_sft"))[0] == TEXTS[:20]
    keys = {data_cache_path(dataclasses.replace(cfg, split=s)) for s in ("train_sft", "train_gen")}
    assert len(keys) == 2
    with pytest.raises(UserError, match=r"^data.revision is for hub datasets, but data.source '.*saved' is local"):
        documents(dataclasses.replace(cfg, split="train_sft", revision="v1"))


def test_unpacked_drops_empty_documents(tokenizer_file, tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = ["first doc", "", "third doc is here"]
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in rows))
    cfg = DataConfig(source=str(path), text_column="body", tokenizer=tokenizer_file, validation_split=0.0, packing=False,
                     seq_len=4, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, log=quiet)
    assert data.validation.num_tokens == 0 and len(data.validation) == 0
    assert data.train.num_docs == 3 and len(data.train) == 2  # the empty one is only an EOS
    expected = [ids[:5] for ids in encode_docs(data.tokenizer, [rows[0], rows[2]], data.eos_id)]
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(data.train[i], ids)


# --------------------------------------------------------------------------- user errors


def test_missing_source_file_names_it(tmp_path):
    missing = str(tmp_path / "nope" / "docs.jsonl")
    with pytest.raises(UserError, match=re.escape(f"data.source: no such file or folder '{missing}'")):
        prepare_data(DataConfig(source=missing, cache_dir=str(tmp_path)), log=quiet)


def test_missing_text_column_names_it_and_the_columns(tmp_path):
    path, _ = write_source("jsonl", tmp_path)
    cfg = DataConfig(source=str(path), text_column="content", cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"data.text_column: no column 'content' .*\(columns: text, id\)"):
        prepare_data(cfg, log=quiet)


def test_loading_local_files_prints_no_progress_bars(tmp_path, capfd):
    path, _ = write_source("jsonl", tmp_path)
    cfg = DataConfig(source=str(path), text_column="content", cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError):
        prepare_data(cfg, log=quiet)
    assert capfd.readouterr().err == ""  # the CLI's error stays the only line on stderr


def test_hub_name_offline_is_a_user_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="someone/not-a-dataset", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="data.source: cannot load hub dataset 'someone/not-a-dataset'") as e:
        prepare_data(cfg, log=quiet)
    assert "\n" not in str(e.value)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(path))
    path_docs, _ = write_source("jsonl", tmp_path)
    cfg = DataConfig(source=str(path_docs), tokenizer=str(path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="no end-of-document token"):
        prepare_data(cfg, log=quiet)


def test_load_before_prepare_says_run_prepare(tmp_path):
    cfg = DataConfig(max_documents=3, vocab_size=300, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"data: not prepared .*run 'bigtrain prepare RECIPE'"):
        load_prepared(cfg)
    assert not (tmp_path / "tokenizers").exists()  # finding the cache path trained nothing


def test_flipped_byte_in_shard_is_detected_and_named(stdlib, tmp_path):
    cfg = copy_cache(stdlib[0], tmp_path)
    path = data_cache_path(cfg)
    shard = path / "train" / "tokens-00000.bin"
    blob = bytearray(shard.read_bytes())
    blob[1234] ^= 0xFF
    shard.write_bytes(bytes(blob))
    load_prepared(cfg, verify=False)  # same size: only the checksum can tell
    expected = f"corrupted shard {re.escape(str(shard))}: sha256 mismatch .* delete {re.escape(str(path))} and run"
    with pytest.raises(UserError, match=expected):
        load_prepared(cfg, verify=True)


def test_truncated_shard_is_detected_and_named(stdlib, tmp_path):
    cfg = copy_cache(stdlib[0], tmp_path)
    shard = data_cache_path(cfg) / "validation" / "tokens-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 2)
    with pytest.raises(UserError, match=f"corrupted shard {re.escape(str(shard))}: .*bytes, expected"):
        load_prepared(cfg, verify=False)


# --------------------------------------------------------------------------- sampler


def sampler(n, *, gbs=8, mbs=2, rank=0, world=1, seed=3):
    return GlobalSampler(n, seed=seed, global_batch_size=gbs, micro_batch_size=mbs, rank=rank, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_epoch_visits_every_sample_once_across_ranks(world):
    n, gbs = 48, 8
    seen = []
    for consumed in range(0, 2 * n, gbs):
        for rank in range(world):
            seen += [i for mb in sampler(n, gbs=gbs, rank=rank, world=world).rank_micro_batches(consumed) for i in mb]
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))


def test_epochs_have_different_orders():
    s = sampler(48, gbs=48, mbs=48)
    first, second = s.global_indices(0), s.global_indices(48)
    assert sorted(first) == sorted(second) and not np.array_equal(first, second)
    assert s.epoch(47) == 0 and s.epoch(48) == 1


def test_rank_slices_are_disjoint_contiguous_and_split_into_micro_batches():
    world, gbs, mbs = 4, 16, 2
    whole = sampler(100, gbs=gbs, mbs=mbs, world=world).global_indices(40)
    parts = []
    for rank in range(world):
        micro = sampler(100, gbs=gbs, mbs=mbs, rank=rank, world=world).rank_micro_batches(40)
        assert len(micro) == gbs // world // mbs and all(len(mb) == mbs for mb in micro)
        parts.append(np.concatenate(micro))
    np.testing.assert_array_equal(np.concatenate(parts), whole)  # rank r holds [r*k:(r+1)*k]
    assert len(set(np.concatenate(parts).tolist())) == gbs


def test_global_order_does_not_depend_on_world_size_or_micro_batch():
    for consumed in (0, 8, 96):
        one = np.concatenate(sampler(50, mbs=4).rank_micro_batches(consumed))
        two = np.concatenate([np.concatenate(sampler(50, mbs=1, rank=r, world=2).rank_micro_batches(consumed)) for r in range(2)])
        np.testing.assert_array_equal(one, two)


def test_resume_from_any_position_gives_the_same_order():
    n, gbs = 37, 8
    run = sampler(n, gbs=gbs)
    history = [run.global_indices(c) for c in range(0, 200, gbs)]
    for k, consumed in enumerate(range(0, 200, gbs)):
        resumed = sampler(n, gbs=gbs)  # fresh object, as after a restart
        np.testing.assert_array_equal(resumed.global_indices(consumed), history[k])
    # Any integer position works, not only batch boundaries.
    np.testing.assert_array_equal(sampler(n, gbs=gbs).global_indices(13)[:3], np.concatenate(history)[13:16])


def test_global_batch_crossing_an_epoch_boundary():
    n = 10
    s = sampler(n, gbs=8, mbs=4)
    batch = s.global_indices(8)  # positions 8..15: two of epoch 0, six of epoch 1
    perm0, perm1 = IndexPermutation(n, 3, 0)(np.arange(n)), IndexPermutation(n, 3, 1)(np.arange(n))
    np.testing.assert_array_equal(batch, np.concatenate([perm0[8:], perm1[:6]]))
    tiny = sampler(3, gbs=8, mbs=8).global_indices(0)  # a batch larger than the dataset spans 3 epochs
    assert sorted(tiny[:3]) == sorted(tiny[3:6]) == [0, 1, 2]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 1000, 4097])
def test_index_permutation_is_a_bijection_that_depends_on_seed_and_epoch(n):
    orders = {(seed, epoch): IndexPermutation(n, seed, epoch)(np.arange(n)) for seed in (0, 1) for epoch in (0, 1)}
    for order in orders.values():
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
    if n >= 7:
        assert len({tuple(o.tolist()) for o in orders.values()}) == 4
    np.testing.assert_array_equal(IndexPermutation(n, 1, 1)(np.arange(n)[::-1]), orders[1, 1][::-1])  # any positions


def test_sampler_of_a_billion_samples_holds_no_permutation_and_reads_any_position_alike():
    """A materialised int64 permutation of 10**9 samples would be 8 GB per rank and epoch; the sampler allocates
    nothing of that order, and a batch at the end of an epoch is drawn like one at the start: well spread
    over the samples (mean near n/2, no two alike)."""
    import tracemalloc

    n = 10**9
    tracemalloc.start()
    s = sampler(n, gbs=4096, mbs=4096)
    first, last, next_epoch = s.global_indices(0), s.global_indices(n - 4096), s.global_indices(n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # bytes: a few batches of indices, no permutation
    for batch in (first, last, next_epoch):
        assert len(set(batch.tolist())) == 4096 and batch.min() >= 0 and batch.max() < n
        assert abs(batch.mean() / n - 0.5) < 0.03 and batch.std() / n > 0.25  # uniform: sd of U(0, 1) is 0.289
    assert not np.array_equal(first, next_epoch)


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        sampler(100, gbs=10, mbs=4, world=1)
    with pytest.raises(ValueError, match="not divisible"):
        sampler(100, gbs=8, mbs=2, world=3)


@pytest.mark.parametrize("n,world,limit", [(10, 3, None), (7, 4, None), (100, 3, 11), (2, 4, None), (5, 2, 50)])
def test_eval_indices_cover_every_sample_once(n, world, limit):
    chunks = [eval_indices(n, rank, world, limit) for rank in range(world)]
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(min(n, limit or n)))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert eval_busiest_count(n, world, limit) == max(map(len, chunks))


# --------------------------------------------------------------------------- tasks: special tokens and cache keys


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_splits(path: Path, splits: dict[str, dict]) -> Path:
    """A save_to_disk DatasetDict with the given {split: columns}."""
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def word_level_tokenizer(path: Path, specials: list[str]) -> str:
    """A whitespace word-level tokenizer.json with the given special tokens (ids 0..), words after."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(specials + ["[UNK]", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return str(path)


def test_trained_bpe_has_five_special_tokens_at_fixed_ids(stdlib):
    _, data = stdlib
    names = ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"]
    assert [data.tokenizer.token_to_id(n) for n in names] == [0, 1, 2, 3, 4]
    assert (data.eos_id, data.pad_id, data.mask_id, data.cls_id, data.sep_id) == (0, 1, 2, 3, 4)
    assert data.special_ids == (0, 1, 2, 3, 4) and data.labels is None and data.task == "causal_lm"


def test_user_tokenizer_special_ids_by_name_with_fallbacks(tmp_path):
    path, _ = write_source("jsonl", tmp_path)
    bert = word_level_tokenizer(tmp_path / "bert.json", ["[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    cfg = DataConfig(source=str(path), tokenizer=bert, seq_len=8, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="masked_lm", log=quiet)
    assert (data.eos_id, data.pad_id, data.cls_id, data.sep_id, data.mask_id) == (2, 0, 1, 2, 3)  # EOS falls to [SEP]
    assert data.special_ids == (0, 1, 2, 3)
    bare = word_level_tokenizer(tmp_path / "bare.json", ["</s>"])
    data = prepare_data(dataclasses.replace(cfg, tokenizer=bare), log=quiet)
    assert data.eos_id == data.pad_id == data.cls_id == data.sep_id == 0 and data.mask_id is None
    assert data.special_ids == (0,)


def test_masked_lm_without_mask_token_names_data_tokenizer(tmp_path):
    path, _ = write_source("jsonl", tmp_path)
    bare = word_level_tokenizer(tmp_path / "bare.json", ["</s>", "<pad>"])
    cfg = DataConfig(source=str(path), tokenizer=bare, cache_dir=str(tmp_path / "c"))
    expected = r"^data.tokenizer: .*bare.json' has no mask token \(looked for <\|mask\|>, \[MASK\], <mask>\)"
    with pytest.raises(UserError, match=expected):
        prepare_data(cfg, task="masked_lm", log=quiet)
    assert prepare_data(cfg, task="causal_lm", log=quiet).mask_id is None  # other tasks do not need one


def test_cache_key_differs_by_task_and_by_the_columns_it_reads(tmp_path):
    cfg = DataConfig(source="python-stdlib-docstrings", max_documents=3, vocab_size=300, cache_dir=str(tmp_path))
    paths = {task: data_cache_path(cfg, task=task) for task in ("causal_lm", "masked_lm", "classification", "sft")}
    assert len(set(paths.values())) == 4 and data_cache_path(cfg) == paths["causal_lm"]
    assert data_cache_path(dataclasses.replace(cfg, pair_column="prompt"), task="classification") != paths["classification"]
    assert data_cache_path(dataclasses.replace(cfg, messages_column="chat"), task="sft") != paths["sft"]
    assert data_cache_path(dataclasses.replace(cfg, label_column="path"), task="causal_lm") == paths["causal_lm"]  # unread
    with pytest.raises(UserError, match="task.name: unknown task 'lm'"):
        data_cache_path(cfg, task="lm")
    assert not (tmp_path / "tokenizers").exists()


# --------------------------------------------------------------------------- tasks: classification

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def classification_rows(n: int = 24, labels=("neg", "pos", "mid")) -> list[dict]:
    return [{"text": sentence(i, 1 + i % 9), "other": sentence(i + 3, 1 + (i * 5) % 11), "label": labels[i % len(labels)]}
            for i in range(n)]


def test_classification_samples_are_cls_text_eos_with_train_label_ids(tokenizer_file, tmp_path):
    rows = classification_rows()
    source = write_jsonl(tmp_path / "cls.jsonl", rows)
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, seq_len=8, validation_split=0.25, packing=True,
                     cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="classification", log=quiet)
    assert data.labels == ["mid", "neg", "pos"]  # sorted, from the training split
    assert json.loads((data.path / "index.json").read_text())["labels"] == ["mid", "neg", "pos"]
    train = load_documents(cfg, resolve_source(cfg), cache_dir=cfg_cache(cfg), task="classification").train
    assert len(data.train) == len(train) and len(data.validation) == len(rows) - len(train)  # never packed
    for i, row in enumerate(train):
        sample = data.train[i]
        text_ids = data.tokenizer.encode(row["text"], add_special_tokens=False).ids
        expected = [data.cls_id] + text_ids[: cfg.seq_len - 2] + [data.eos_id]
        np.testing.assert_array_equal(sample["tokens"], expected)
        assert sample["tokens"].dtype == np.int64 and len(sample["tokens"]) <= cfg.seq_len
        assert sample["label"] == data.labels.index(row["label"])
    assert any(len(data.tokenizer.encode(r["text"]).ids) > cfg.seq_len - 2 for r in train)  # truncation was tested


def test_classification_pairs_truncate_the_longer_text_first(tokenizer_file, tmp_path):
    from bigtrain.data.examples import pair_lengths

    assert pair_lengths(3, 4, 10) == (3, 4)
    assert pair_lengths(20, 2, 10) == (8, 2) and pair_lengths(2, 20, 10) == (2, 8)
    assert pair_lengths(9, 7, 10) == (5, 5) and pair_lengths(9, 9, 9) == (4, 5)
    source = write_jsonl(tmp_path / "pairs.jsonl", classification_rows())
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, pair_column="other", seq_len=9, validation_split=0.0,
                     cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="classification", log=quiet)
    for i, row in enumerate(classification_rows()):
        a = data.tokenizer.encode(row["text"], add_special_tokens=False).ids
        b = data.tokenizer.encode(row["other"], add_special_tokens=False).ids
        keep_a, keep_b = pair_lengths(len(a), len(b), cfg.seq_len - 3)
        tokens = data.train[i]["tokens"]
        np.testing.assert_array_equal(tokens, [data.cls_id] + a[:keep_a] + [data.sep_id] + b[:keep_b] + [data.eos_id])
        assert len(tokens) <= cfg.seq_len


def test_classification_int_labels_sort_numerically(tokenizer_file, tmp_path):
    texts = [sentence(i, 3) for i in range(6)]
    saved = save_splits(tmp_path / "ints", {"train": {"text": texts[:4], "label": [10, 2, 1, 2]},
                                            "validation": {"text": texts[4:], "label": [2, 10]}})
    cfg = DataConfig(source=str(saved), tokenizer=tokenizer_file, seq_len=16, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="classification", log=quiet)
    assert data.labels == [1, 2, 10]
    assert [data.train[i]["label"] for i in range(4)] == [2, 1, 0, 1]
    assert [data.validation[i]["label"] for i in range(2)] == [1, 2]


def test_unseen_validation_label_names_label_column_and_split(tokenizer_file, tmp_path):
    saved = save_splits(tmp_path / "s", {"train": {"text": ["x", "y", "z"], "label": ["b", "a", "c"]},
                                         "validation": {"text": ["w"], "label": ["xyz"]}})
    cfg = DataConfig(source=str(saved), tokenizer=tokenizer_file, seq_len=16, cache_dir=str(tmp_path / "c"))
    expected = "data.label_column 'label': validation label 'xyz' does not occur in the training split (labels: a, b, c)"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        prepare_data(cfg, task="classification", log=quiet)


@pytest.mark.parametrize("key,value", [("label_column", "topic"), ("pair_column", "second"), ("text_column", "body")])
def test_classification_missing_column_names_it_and_the_columns(tokenizer_file, tmp_path, key, value):
    source = write_jsonl(tmp_path / "cls.jsonl", classification_rows())
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, cache_dir=str(tmp_path / "c"), **{key: value})
    with pytest.raises(UserError, match=rf"^data.{key}: no column '{value}' .*\(columns: text, other, label\)$"):
        prepare_data(cfg, task="classification", log=quiet)


# --------------------------------------------------------------------------- tasks: sft


def sft_rows(n: int = 20) -> list[dict]:
    """Short prompt/response pairs; row 2 has an empty prompt (all loss)."""
    return [{"prompt": f"Q{i}: " + sentence(i, 1 + i % 4) if i != 2 else "", "response": " " + sentence(i + 1, 1 + i % 3)}
            for i in range(n)]


def sft_examples(data, rows):
    """(tokens, loss_mask) of each row as written: prompt + response + [eos], loss on response + eos."""
    out = []
    for row in rows:
        p = data.tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        r = data.tokenizer.encode(row["response"], add_special_tokens=False).ids
        out.append((np.array(p + r + [data.eos_id]), np.array([False] * len(p) + [True] * (len(r) + 1))))
    return out


def test_sft_loss_mask_covers_exactly_response_and_eos(tokenizer_file, tmp_path):
    rows = sft_rows()
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, seq_len=64, packing=False, validation_split=0.0,
                     cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="sft", log=quiet)
    assert len(data.train) == len(rows)
    for i, (tokens, mask) in enumerate(sft_examples(data, rows)):
        sample = data.train[i]
        np.testing.assert_array_equal(sample["tokens"], tokens)
        np.testing.assert_array_equal(sample["loss_mask"], mask)
        assert sample["loss_mask"].dtype == bool and sample["segments"].dtype == np.int32 and not sample["segments"].any()


def test_sft_packing_puts_whole_examples_in_order_with_segment_ids(tokenizer_file, tmp_path):
    rows = sft_rows(40)
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, seq_len=63, packing=True, validation_split=0.0,
                     cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="sft", log=quiet)
    examples = sft_examples(data, rows)
    assert max(len(t) for t, _ in examples) <= cfg.seq_len + 1  # every example fits: none is cut
    seen = []
    for i in range(len(data.train)):
        sample = data.train[i]
        assert len(sample["tokens"]) <= cfg.seq_len + 1
        segments = sample["segments"]
        assert segments[0] == 0 and set(np.diff(segments)) <= {0, 1}  # 0, 1, 2, … in order
        for s in range(segments[-1] + 1):
            seen.append((sample["tokens"][segments == s], sample["loss_mask"][segments == s]))
        if i + 1 < len(data.train):  # greedy: the next example would not have fitted
            assert len(sample["tokens"]) + len(examples[len(seen)][0]) > cfg.seq_len + 1
    assert len(data.train) < len(rows) // 2 and len(seen) == len(rows)
    for (tokens, mask), (want_tokens, want_mask) in zip(seen, examples):
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(mask, want_mask)


def test_sft_long_example_keeps_prompt_tail_and_response_head(tokenizer_file, tmp_path):
    from bigtrain.data.dataset import sft_windows

    starts, prompts = np.array([0, 100, 200]), np.array([10, 30, 3])
    ends = np.array([15, 140, 240])  # fits; long prompt and response; short prompt, long response
    window_starts, window_stops = sft_windows(starts, ends, prompts, room=16)
    np.testing.assert_array_equal(window_starts, [0, 122, 200])  # prompt tails: whole, 8 (half the room), whole
    np.testing.assert_array_equal(window_stops, [15, 138, 216])  # response heads: whole, 8, 13
    rows = [{"prompt": sentence(0, 30), "response": " " + sentence(5, 30)}]
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "long.jsonl", rows)), tokenizer=tokenizer_file, seq_len=15,
                     packing=True, validation_split=0.0, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="sft", log=quiet)
    (tokens, mask), = sft_examples(data, rows)
    prompt_len = int((~mask).sum())
    sample = data.train[0]
    np.testing.assert_array_equal(sample["tokens"], tokens[prompt_len - 8 : prompt_len + 8])
    np.testing.assert_array_equal(sample["loss_mask"], [False] * 8 + [True] * 8)


def test_sft_messages_column_renders_turns_and_masks_assistant_turns(tokenizer_file, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"},
            {"role": "assistant", "content": "Bye"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"chat": chat}, {"chat": chat[1:3]}])
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, messages_column="chat", seq_len=128,
                     validation_split=0.0, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="sft", log=quiet)
    sample = data.train[0]  # packed: both chats, segments 0 and 1
    decode = lambda ids: data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    first = sample["segments"] == 0
    assert decode(sample["tokens"][first]) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nMore\n<|assistant|>\nBye<|endoftext|>"
    )
    assert decode(sample["tokens"][first & sample["loss_mask"]]) == "HelloBye<|endoftext|>"
    second = sample["segments"] == 1
    assert decode(sample["tokens"][second]) == "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>"
    assert decode(sample["tokens"][second & sample["loss_mask"]]) == "Hello<|endoftext|>"


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer_folder(tokenizer_file: str, folder: Path, template: str) -> Path:
    """A Hugging Face style tokenizer folder: the BPE plus ChatML's tokens, and a chat template."""
    import tokenizers

    folder.mkdir()
    tok = tokenizers.Tokenizer.from_file(tokenizer_file)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": template}))
    return folder


def test_sft_messages_use_the_tokenizers_chat_template_like_transformers(tokenizer_file, tmp_path):
    """Tokens equal transformers' apply_chat_template; loss is each assistant turn through <|im_end|>."""
    transformers = pytest.importorskip("transformers")
    folder = chat_tokenizer_folder(tokenizer_file, tmp_path / "tok", CHATML)
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "More"},
              {"role": "assistant", "content": " Bye"}],
             [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x"}]]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"chat": c} for c in chats])
    cfg = DataConfig(source=str(source), tokenizer=str(folder / "tokenizer.json"), messages_column="chat",
                     seq_len=128, packing=False, validation_split=0.0, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task="sft", log=quiet)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    decode = lambda ids: data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    # A token that overlaps a turn is loss: "\n    return" encodes as "\n   " + " return".
    replies = ["Hello there<|im_end|> Bye<|im_end|>", "\n    return x<|im_end|>"]
    for i, chat in enumerate(chats):
        sample = data.train[i]
        tokens, loss = sample["tokens"][:-1], sample["loss_mask"][:-1]  # the EOS that separates examples
        assert tokens.tolist() == theirs.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        assert sample["tokens"][-1] == data.eos_id and not sample["loss_mask"][-1]
        assert decode(tokens[loss]) == replies[i]
    # The template is part of the cache key: another template, another cache.
    other = chat_tokenizer_folder(tokenizer_file, tmp_path / "tok2", CHATML.replace("\n{{ m['content'] }}", ": {{ m['content'] }}"))
    assert data_cache_path(dataclasses.replace(cfg, tokenizer=str(other / "tokenizer.json")), task="sft") != data.path


def test_sft_chat_template_that_rewrites_history_is_named(tokenizer_file, tmp_path):
    rewrites = CHATML.replace("{{ m['content'] }}", "{{ m['content'] if loop.last else '...' }}")
    folder = chat_tokenizer_folder(tokenizer_file, tmp_path / "tok", rewrites)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "Bye"}]
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "chat.jsonl", [{"chat": chat}])), messages_column="chat",
                     tokenizer=str(folder / "tokenizer.json"), validation_split=0.0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"^data.messages_column 'chat': the chat template in .* renders a "
                                        r"conversation's earlier turns differently .* \(assistant turn 1\)"):
        prepare_data(cfg, task="sft", log=quiet)


def test_sft_missing_prompt_column_names_it(tokenizer_file, tmp_path):
    source = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "response": "r"}])
    cfg = DataConfig(source=str(source), tokenizer=tokenizer_file, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"^data.prompt_column: no column 'prompt' .*\(columns: question, response\)$"):
        prepare_data(cfg, task="sft", log=quiet)


# --------------------------------------------------------------------------- tasks: checksums of per-task files


@pytest.mark.parametrize("task,file,what", [("classification", "labels.npy", "labels"), ("sft", "loss_spans.npy", "loss spans")])
def test_corrupted_task_file_is_detected_and_named(tokenizer_file, tmp_path, task, file, what):
    rows = [{**c, **s} for c, s in zip(classification_rows(), sft_rows(24))]
    cfg = DataConfig(source=str(write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer=tokenizer_file, seq_len=32,
                     validation_split=0.25, cache_dir=str(tmp_path / "c"))
    data = prepare_data(cfg, task=task, log=quiet)
    index = json.loads((data.path / "index.json").read_text())
    assert [a["file"] for a in index["splits"]["train"]["arrays"]] == [file]
    path = data.path / "train" / file
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # a label id / span position, same size
    path.write_bytes(bytes(blob))
    load_prepared(cfg, task=task, verify=False)  # only the checksum can tell
    with pytest.raises(UserError, match=f"^corrupted {what} file {re.escape(str(path))}: sha256 mismatch .* delete"):
        load_prepared(cfg, task=task, verify=True)
    path.write_bytes(bytes(blob[:-8]))
    with pytest.raises(UserError, match=f"^corrupted {what} file {re.escape(str(path))}: {len(blob) - 8} bytes"):
        load_prepared(cfg, task=task, verify=False)
    path.unlink()
    with pytest.raises(UserError, match=f"^missing {what} file {re.escape(str(path))}"):
        load_prepared(cfg, task=task, verify=False)


def test_a_run_checksums_the_cache_once_then_checks_sizes(stdlib, tmp_path):
    from bigtrain.data.prepare import verify_prepared_once

    cfg = copy_cache(stdlib[0], tmp_path)
    data = load_prepared(cfg, verify=False)
    shard = data.path / "train" / "tokens-00000.bin"
    verify_prepared_once(cfg)  # the first time: every byte, then recorded
    assert (data.path / "verified.json").is_file()
    blob = bytearray(shard.read_bytes())
    blob[0] ^= 0xFF
    shard.write_bytes(bytes(blob))
    verify_prepared_once(cfg)  # same size: only a checksum would tell, and it is not repeated
    (data.path / "verified.json").unlink()
    with pytest.raises(UserError, match="corrupted shard .*sha256 mismatch"):
        verify_prepared_once(cfg)
    shard.write_bytes(bytes(blob[:-2]))
    with pytest.raises(UserError, match="corrupted shard .*bytes, expected"):
        verify_prepared_once(cfg)


def test_prepare_without_init_from_imports_no_torch(tmp_path, cache_dir):
    """slurm/launch.sh runs `bigtrain prepare` at every job start: for a recipe without model.init_from it stays
    clear of torch's import (about 2 s here), and the second run finds the cache and only opens it."""
    import subprocess
    import sys

    from tests.conftest import REPO, tiny_recipe, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
    code = ("import sys; from bigtrain.cli import main; rc = main(['prepare', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd=REPO,
                           timeout=300) for _ in range(2)]
    for result in runs:
        assert result.stdout.splitlines()[-1] == "0 False", result.stderr[-2000:]
        assert result.stdout.splitlines()[-2].startswith("prepared ")
    assert runs[1].stdout.startswith("data: already prepared at ")  # nothing tokenized the second time


# --------------------------------------------------------------------------- mixtures


def mixture(sizes: dict[str, int], weights: list[float], *, seed: int = 0, exhaust: str = "repeat"):
    from bigtrain.data.mixture import MixtureDataset

    datasets = [[(name, i) for i in range(n)] for name, n in sizes.items()]
    return MixtureDataset(list(sizes), datasets, weights, seed=seed, exhaust=exhaust)


def test_mixture_gives_each_source_its_share_of_any_1000_consecutive_samples():
    mix = mixture({"a": 5000, "b": 3000, "c": 77}, [0.6, 0.3, 0.1])
    rng = np.random.default_rng(0)
    for start in [0, 1, 499, 999, 1000, 123_456, *rng.integers(0, 10**7, 20)]:
        names = [mix[p][0] for p in range(int(start), int(start) + 1000)]
        shares = {name: names.count(name) / 1000 for name in "abc"}
        assert shares == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1}, abs=0.02), start
        assert mix.samples_per_source(int(start) + 1000) == {
            n: c + names.count(n) for n, c in mix.samples_per_source(int(start)).items()}
    # Awkward weights still fill every block of 1,000 exactly.
    odd = mixture({"x": 10, "y": 10, "z": 10}, [1, 1, 1])
    assert sum(odd.samples_per_source(1000).values()) == 1000


def test_mixture_order_is_a_pure_function_of_seed_and_position():
    a, b = mixture({"a": 500, "b": 300}, [0.7, 0.3]), mixture({"a": 500, "b": 300}, [0.7, 0.3])
    positions = [0, 5, 999, 4321, 10**9]
    assert [a[p] for p in positions] == [b[p] for p in reversed(positions)][::-1]  # any order of access
    other = mixture({"a": 500, "b": 300}, [0.7, 0.3], seed=1)
    assert [a[p] for p in range(200)] != [other[p] for p in range(200)]


def test_mixture_repeat_reads_a_small_source_whole_before_it_repeats_it_in_another_order():
    mix = mixture({"big": 10_000, "small": 40}, [0.5, 0.5])
    draws = [mix[p][1] for p in range(400) if mix[p][0] == "small"]  # 200 draws of a 40-sample source
    passes = [draws[i:i + 40] for i in range(0, 200, 40)]
    assert all(sorted(p) == list(range(40)) for p in passes) and passes[0] != passes[1]
    assert mix.passes(400) == {"big": pytest.approx(0.02), "small": pytest.approx(5.0)}


def test_mixture_validation_takes_the_sources_in_turn_so_max_samples_scores_each_alike():
    """A mixture's validation splits (sizes 5, 2, 0, 300 here): sample k of every source in turn, a source that has
    run out passed over; every sample once; the first N group by source evenly, whatever data.mixture's order."""
    from bigtrain.data.mixture import InterleavedSamples

    splits = {"a": 5, "b": 2, "empty": 0, "big": 300}
    val = InterleavedSamples(list(splits), [[(name, i) for i in range(n)] for name, n in splits.items()])
    assert len(val) == 307
    assert [val[p] for p in range(9)] == [("a", 0), ("b", 0), ("big", 0), ("a", 1), ("b", 1), ("big", 1),
                                          ("a", 2), ("big", 2), ("a", 3)]
    assert sorted(val[p] for p in range(len(val))) == sorted((n, i) for n, size in splits.items() for i in range(size))
    first = val.positions(16)  # a: all 5, b: both, big: the rest
    assert {name: len(p) for name, p in first.items()} == {"a": 5, "b": 2, "big": 9}
    assert all(val[int(p)][0] == name for name, positions in first.items() for p in positions)
    assert sorted(np.concatenate(list(first.values()))) == list(range(16))
    even = InterleavedSamples(["x", "y", "z"], [[("x", i) for i in range(100)], [("y", i) for i in range(80)],
                                                [("z", i) for i in range(90)]])
    assert {name: len(p) for name, p in even.positions(100).items()} == {"x": 34, "y": 33, "z": 33}
    assert {name: len(p) for name, p in even.positions(None).items()} == {"x": 100, "y": 80, "z": 90}
    with pytest.raises(IndexError):
        val[307]


def test_mixture_stop_ends_the_epoch_with_the_first_source_to_run_out():
    mix = mixture({"a": 1500, "b": 2500}, [0.5, 0.5], exhaust="stop")
    assert len(mix) == 3000  # b would last 5 blocks, a runs out after 3
    epoch0 = [mix[p] for p in range(3000)]
    assert len(set(epoch0)) == 3000  # no sample twice in an epoch
    assert sorted(i for name, i in epoch0 if name == "a") == list(range(1500))  # a: all of it, once
    epoch1 = [mix[p] for p in range(3000, 6000)]
    assert epoch1 != epoch0 and sorted(i for name, i in epoch1 if name == "a") == list(range(1500))
    with pytest.raises(UserError, match="source b has 3 training samples, fewer than its 500 per 1000"):
        mixture({"a": 1500, "b": 3}, [0.5, 0.5], exhaust="stop")


@pytest.mark.parametrize("mixture_cfg, message", [
    ([{"source": "a.jsonl", "weight": 0}], r"^data.mixture\[0\].weight=0 must be > 0"),
    ([{"source": "a.jsonl", "weight": -1}], r"^data.mixture\[0\].weight=-1 must be > 0"),
    ([{"weight": 1}], r"^data.mixture\[0\] has no source"),
    ([{"source": "a.jsonl", "weight": 1, "tokenizer": "t1.json"}, {"source": "b.jsonl", "weight": 1}],
     r"^data.mixture: the sources use different tokenizers \(None, t1.json\)"),
    ([{"source": "a.jsonl", "weight": 1, "name": "x"}, {"source": "b.jsonl", "weight": 1, "name": "x"}],
     r"^data.mixture: two sources are named alike"),
])
def test_bad_mixture_is_one_line_naming_the_entry(mixture_cfg, message):
    from bigtrain.config import ConfigError, build_config, validate

    with pytest.raises(ConfigError, match=message):
        validate(build_config({"data": {"mixture": mixture_cfg}}))


def test_mixture_entry_with_an_unknown_key_is_named():
    from bigtrain.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in data.mixture — one of: source, weight"):
        build_config({"data": {"mixture": [{"source": "a.jsonl", "wieght": 1}]}})


def test_mixture_for_a_fine_tuning_task_is_one_line():
    from bigtrain.config import ConfigError, build_config, validate

    raw = {"data": {"mixture": [{"source": "a.jsonl", "weight": 1}]}, "task": {"name": "sft"}}
    with pytest.raises(ConfigError, match=r"^data.mixture is for pretraining \(task.name causal_lm or masked_lm\), not sft"):
        validate(build_config(raw))


def test_bpe_trains_on_a_uniform_sample_of_a_corpus_over_its_budget(tmp_path):
    """The first half of the documents speaks of one word, the second of another: a BPE trained on a sample a
    third the corpus's size learns both (a prefix of that size would see only the first); a budget the corpus
    fits in trains on every document, as before sampling existed."""
    from tokenizers import Tokenizer

    halves = ["quokkaquokka marsupial " * 30, "zeppelinzeppelin airship " * 30]
    rows = [{"text": f"{halves[i >= 600]} {i}"} for i in range(1200)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    size = sum(len(r["text"]) for r in rows)

    def bpe(cache: str, sample_bytes: int | None) -> Tokenizer:
        cfg = DataConfig(source=str(corpus), vocab_size=300, validation_split=0.0, cache_dir=str(tmp_path / cache),
                         tokenizer_sample_bytes=sample_bytes)
        return prepare_data(cfg, log=quiet).tokenizer

    sampled = bpe("sampled", size // 3)
    for word in ("quokkaquokka", "zeppelinzeppelin"):
        assert len(sampled.encode(word).ids) <= 3, (word, sampled.encode(word).tokens)
    assert bpe("sampled-again", size // 3).to_str() == sampled.to_str()  # the sample is the same every time
    whole, default = bpe("whole", 10 * size), bpe("default", None)
    assert whole.get_vocab() == default.get_vocab()


def test_streaming_prepare_of_a_local_folder_equals_the_loaded_prepare(tmp_path, monkeypatch):
    """data.streaming reads a folder of jsonl files as a stream, in pieces (two workers; pieces of 200 documents
    here, 20,000 normally), and writes the same train and validation streams as loading it (same documents,
    same held-out rows)."""
    monkeypatch.setattr(prepare_module, "STREAM_PIECE_DOCS", 200)
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [l for l in Path(json.__file__).with_name("decoder.py").read_text().splitlines() if l.strip()]
    for part in range(3):
        rows = [{"text": "\n".join(lines[(i * 5) % len(lines):(i * 5) % len(lines) + 4]), "id": i}
                for i in range(part * 300, part * 300 + 300)]
        (folder / f"part-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(folder), vocab_size=400, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "loaded"),
                     validation_split=0.1)
    loaded = prepare_data(cfg, log=quiet)
    streamed = prepare_data(dataclasses.replace(cfg, streaming=True, cache_dir=str(tmp_path / "streamed")), workers=2,
                            log=quiet)
    shards = json.loads((streamed.path / "index.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) == -(-loaded.train.num_docs // 200) >= 4  # one per piece
    assert streamed.path.name != loaded.path.name  # streaming is part of the key
    assert loaded.tokenizer.to_str() == streamed.tokenizer.to_str()  # the whole corpus is within the BPE's budget
    a, b = split_files(loaded), split_files(streamed)
    assert 0 < len(b["validation"]["stream"]) < len(b["train"]["stream"])
    for split in a:
        for name in a[split]:
            np.testing.assert_array_equal(a[split][name], b[split][name], err_msg=f"{split} {name}")
    assert not list((tmp_path / "streamed").glob("hf-datasets/**/*.arrow"))  # nothing converted to Arrow


def test_data_tokenizer_may_be_a_hugging_face_tokenizer_folder(stdlib, tokenizer_file, tmp_path):
    """data.tokenizer naming a folder (as `save_pretrained` writes one) means its tokenizer.json: the same cache."""
    cfg, data = stdlib
    folder = tmp_path / "hf-tokenizer"
    folder.mkdir()
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    by_file = dataclasses.replace(cfg, tokenizer=tokenizer_file, cache_dir=str(tmp_path / "c"))
    by_folder = dataclasses.replace(by_file, tokenizer=str(folder))
    assert data_cache_path(by_folder) == data_cache_path(by_file)
    prepared = prepare_data(by_folder, log=quiet)
    assert prepared.tokenizer.to_str() == data.tokenizer.to_str() and prepared.train.num_tokens == data.train.num_tokens
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=f"^data.tokenizer: no tokenizer.json in folder '{re.escape(str(folder))}'"):
        prepare_data(dataclasses.replace(by_folder, cache_dir=str(tmp_path / "d")), log=quiet)
