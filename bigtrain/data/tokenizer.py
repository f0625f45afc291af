"""Tokenizer: load a given `tokenizer.json`, or train a byte-level BPE on the corpus and cache it.

A trained tokenizer lives at `cache_dir/tokenizers/<key>/tokenizer.json`, where the key
hashes what decides it (source identity, text column, max_documents, validation_split,
vocab_size), so its path is known before training and `data_cache_path` stays cheap.
Special token ids come from the vocabulary by name: the first of `EOS_CANDIDATES` is the
end-of-document token appended to every document; padding uses the first of
`PAD_CANDIDATES`, or the EOS when the tokenizer has none.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from bigtrain.data.sources import Source, stable_hash
from bigtrain.errors import UserError

if TYPE_CHECKING:
    import datasets
    import tokenizers

EOS, PAD = "<|endoftext|>", "<|pad|>"
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = (PAD, "<pad>", "[PAD]")

# BPE training reads at most this much text: merges settle long before a huge corpus ends.
MAX_TRAIN_CHARS = 2**30
_BYTE_ALPHABET = 256


def tokenizer_identity(cfg, source: Source) -> str:
    """What the prepared data depends on: the bytes of a given tokenizer, or the trained one's key."""
    if cfg.tokenizer is None:
        return f"bpe:{_bpe_key(cfg, source)}"
    return f"file:{hashlib.sha256(_read_tokenizer_bytes(cfg.tokenizer)).hexdigest()}"


def trained_tokenizer_path(cfg, source: Source, cache_dir: Path) -> Path:
    return cache_dir / "tokenizers" / _bpe_key(cfg, source) / "tokenizer.json"


def build_tokenizer(cfg, source: Source, train_docs: "datasets.Dataset", *, cache_dir: Path, log: Callable = print):
    """The tokenizer for `cfg`: the file `cfg.tokenizer`, else a BPE trained on `train_docs` (cached)."""
    if cfg.tokenizer is not None:
        return load_tokenizer_file(cfg.tokenizer, where="data.tokenizer")

    path = trained_tokenizer_path(cfg, source, cache_dir)
    if path.exists():
        log(f"data: using cached tokenizer {path}")
        return load_tokenizer_file(path, where="data.tokenizer")

    if cfg.vocab_size < _BYTE_ALPHABET + 2:
        raise UserError(f"data.vocab_size={cfg.vocab_size} is too small for a byte-level BPE (need >= {_BYTE_ALPHABET + 2})")
    log(f"data: training a byte-level BPE (vocab_size={cfg.vocab_size}) on {len(train_docs)} documents")
    t0 = time.perf_counter()
    tok = train_bpe(_text_batches(train_docs, cfg.text_column), cfg.vocab_size)
    log(f"data: trained tokenizer with {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s → {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tokenizer.json.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # a crash never leaves a half-written tokenizer.json
    return tok


def train_bpe(text_batches: Iterator[list[str]], vocab_size: int) -> "tokenizers.Tokenizer":
    """A GPT-2 style byte-level BPE with `<|endoftext|>` (id 0) and `<|pad|>` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(text_batches, trainer=trainer)
    return tok


def load_tokenizer_file(path: str | Path, *, where: str) -> "tokenizers.Tokenizer":
    """Load a `tokenizer.json` and check that it has an end-of-document token."""
    from tokenizers import Tokenizer

    data = _read_tokenizer_bytes(path, where=where)
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # JSON or schema errors from the Rust side
        raise UserError(f"{where}: '{path}' is not a valid tokenizer.json ({str(e).strip() or type(e).__name__})") from None
    special_token_ids(tok, where=f"{where} '{path}'")
    return tok


def special_token_ids(tok: "tokenizers.Tokenizer", *, where: str = "data.tokenizer") -> tuple[int, int]:
    """(eos_id, pad_id) found by name; the pad falls back to the EOS."""
    eos_id = _first_id(tok, EOS_CANDIDATES)
    if eos_id is None:
        raise UserError(f"{where}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")
    pad_id = _first_id(tok, PAD_CANDIDATES)
    return eos_id, eos_id if pad_id is None else pad_id


def _first_id(tok, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _bpe_key(cfg, source: Source) -> str:
    return stable_hash(
        "bpe-v1", source.identity, cfg.text_column, cfg.max_documents, cfg.validation_split, cfg.vocab_size, MAX_TRAIN_CHARS
    )


def _read_tokenizer_bytes(path: str | Path, *, where: str = "data.tokenizer") -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError:
        raise UserError(f"{where}: no such file '{path}'") from None


def _text_batches(docs: "datasets.Dataset", column: str, batch_docs: int = 1000) -> Iterator[list[str]]:
    chars = 0
    for batch in docs.select_columns([column]).iter(batch_size=batch_docs):
        texts = [t for t in batch[column] if t]
        yield texts
        chars += sum(map(len, texts))
        if chars >= MAX_TRAIN_CHARS:
            return
