"""Tokenizer: load a given `tokenizer.json`, or train a byte-level BPE on the corpus and cache it.

A trained tokenizer lives at `cache_dir/tokenizers/<key>/tokenizer.json`, where the key
hashes what decides it (source identity, the text columns it reads for the task,
max_documents, validation_split, vocab_size), so its path is known before training and
`data_cache_path` stays cheap. Tasks that read the same text (causal_lm, masked_lm, and
classification without a pair column) share one BPE.

A trained BPE has the special tokens `<|endoftext|>`, `<|pad|>`, `<|mask|>`, `<|cls|>`,
`<|sep|>` at ids 0..4. Special ids are found in any tokenizer by name (`find_special_ids`):
the first of `EOS_CANDIDATES` is the end-of-document token appended to every document;
pad, cls and sep fall back to the EOS when the tokenizer has none; the mask token has no
fallback (masked_lm needs one).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from bigtrain.data.examples import bpe_text_batches, bpe_text_columns
from bigtrain.data.sources import Source, stable_hash
from bigtrain.core.errors import UserError

if TYPE_CHECKING:
    import datasets
    import tokenizers

EOS, PAD, MASK, CLS, SEP = "<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"
SPECIAL_TOKENS = (EOS, PAD, MASK, CLS, SEP)  # a trained BPE's ids 0..4, in this order
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")  # GPT-2 / Qwen, Llama 3, Llama 2 / Mistral, Gemma, BERT
PAD_CANDIDATES = (PAD, "<pad>", "[PAD]")
MASK_CANDIDATES = (MASK, "[MASK]", "<mask>")
CLS_CANDIDATES = (CLS, "[CLS]", "<s>")
SEP_CANDIDATES = (SEP, "[SEP]", "</s>")

# BPE training reads at most this much text (data.tokenizer_sample_bytes' default), a uniform sample of the
# documents when the corpus is larger: merges settle long before a huge corpus ends.
MAX_TRAIN_CHARS = 2**30
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class SpecialIds:
    """A tokenizer's special token ids; `all` is every special id (MLM never masks these)."""

    eos: int
    pad: int
    mask: int | None
    cls: int
    sep: int
    all: tuple[int, ...]


def tokenizer_identity(cfg, source: Source, task: str = "causal_lm") -> str:
    """What the prepared data depends on: the bytes of a given tokenizer, or the trained one's key."""
    if cfg.tokenizer is None:
        return f"bpe:{_bpe_key(cfg, source, task)}"
    return f"file:{hashlib.sha256(_read_tokenizer_bytes(cfg.tokenizer)).hexdigest()}"


def trained_tokenizer_path(cfg, source: Source, cache_dir: Path, task: str = "causal_lm") -> Path:
    return cache_dir / "tokenizers" / _bpe_key(cfg, source, task) / "tokenizer.json"


def build_tokenizer(
    cfg, source: Source, train_docs: "datasets.Dataset | None", *, cache_dir: Path, task: str = "causal_lm",
    log: Callable = print, text_batches: Iterator[list[str]] | None = None,
):
    """The tokenizer for `cfg`: the file `cfg.tokenizer`, else a BPE trained on `train_docs` (cached).

    The BPE reads the text `task` reads (`examples.bpe_text_batches`), or `text_batches` (a stream's), up to
    data.tokenizer_sample_bytes.
    """
    if cfg.tokenizer is not None:
        return load_tokenizer_file(cfg.tokenizer, where="data.tokenizer")

    path = trained_tokenizer_path(cfg, source, cache_dir, task)
    if path.exists():
        log(f"data: using cached tokenizer {path}")
        return load_tokenizer_file(path, where="data.tokenizer")

    need = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if cfg.vocab_size < need:
        raise UserError(f"data.vocab_size={cfg.vocab_size} is too small for a byte-level BPE (need >= {need})")
    if text_batches is None:
        assert train_docs is not None  # the documents, unless a stream's text_batches are given
        what = f"{len(train_docs)} documents"
    else:
        what = "the stream's first documents"
    log(f"data: training a byte-level BPE (vocab_size={cfg.vocab_size}) on {what}")
    t0 = time.perf_counter()
    text = sampled_text(train_docs, cfg, task) if text_batches is None else _capped(text_batches, cfg)
    tok = train_bpe(text, cfg.vocab_size)
    log(f"data: trained tokenizer with {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f}s → {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tokenizer.json.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # a crash never leaves a half-written tokenizer.json
    return tok


def train_bpe(text_batches: Iterator[list[str]], vocab_size: int) -> "tokenizers.Tokenizer":
    """A GPT-2 style byte-level BPE whose ids 0..4 are `SPECIAL_TOKENS` (EOS, pad, mask, cls, sep)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
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


def find_special_ids(tok: "tokenizers.Tokenizer", *, where: str = "data.tokenizer") -> SpecialIds:
    """Special ids found by name; pad, cls and sep fall back to the EOS, the mask to None."""
    eos = _first_id(tok, EOS_CANDIDATES)
    if eos is None:
        raise UserError(f"{where}: no end-of-document token (looked for {', '.join(EOS_CANDIDATES)})")
    found = [_first_id(tok, names) for names in (PAD_CANDIDATES, CLS_CANDIDATES, SEP_CANDIDATES)]
    pad, cls, sep = (eos if token_id is None else token_id for token_id in found)
    mask = _first_id(tok, MASK_CANDIDATES)
    marked = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    every = marked | {eos, pad, cls, sep} | ({mask} if mask is not None else set())
    return SpecialIds(eos=eos, pad=pad, mask=mask, cls=cls, sep=sep, all=tuple(sorted(every)))


def special_token_ids(tok: "tokenizers.Tokenizer", *, where: str = "data.tokenizer") -> tuple[int, int]:
    """(eos_id, pad_id) found by name; the pad falls back to the EOS."""
    ids = find_special_ids(tok, where=where)
    return ids.eos, ids.pad


def require_mask(ids: SpecialIds, cfg, task: str) -> None:
    """masked_lm needs a mask token: a one-line error naming data.tokenizer when there is none."""
    if task == "masked_lm" and ids.mask is None:
        raise UserError(
            f"data.tokenizer: '{cfg.tokenizer}' has no mask token (looked for {', '.join(MASK_CANDIDATES)}) — "
            "task masked_lm needs one: use a tokenizer that has one, or unset data.tokenizer to train a BPE with <|mask|>"
        )


def _first_id(tok, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _bpe_key(cfg, source: Source, task: str) -> str:
    return stable_hash(
        "bpe-v2",  # v2: five special tokens
        source.identity,
        bpe_text_columns(cfg, task),
        cfg.max_documents,
        cfg.validation_split,
        cfg.vocab_size,
        cfg.tokenizer_sample_bytes or MAX_TRAIN_CHARS,  # unset: the key of every BPE trained before it existed
        *(["streaming"] if cfg.streaming else []),  # a stream's beginning, not a sample
    )


def tokenizer_file(path: str | Path) -> Path:
    """data.tokenizer as a file: a `tokenizer.json`, or a Hugging Face tokenizer folder's `tokenizer.json`."""
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def _read_tokenizer_bytes(path: str | Path, *, where: str = "data.tokenizer") -> bytes:
    try:
        return tokenizer_file(path).read_bytes()
    except OSError:
        what = "no tokenizer.json in folder" if Path(path).expanduser().is_dir() else "no such file"
        raise UserError(f"{where}: {what} '{path}'") from None


def _capped(text_batches: Iterator[list[str]], cfg) -> Iterator[list[str]]:
    """The batches until data.tokenizer_sample_bytes (default MAX_TRAIN_CHARS) of text."""
    budget, taken = cfg.tokenizer_sample_bytes or MAX_TRAIN_CHARS, 0
    for texts in text_batches:
        yield texts
        taken += sum(len(text.encode()) for text in texts)
        if taken >= budget:
            return


def sampled_text(docs: "datasets.Dataset", cfg, task: str, chunk: int = 1000) -> Iterator[list[str]]:
    """The text a BPE trains on: every document's when the split is within data.tokenizer_sample_bytes (default
    MAX_TRAIN_CHARS), else a uniform random sample of documents (a fixed pseudo-random order, read a chunk at a
    time, until the budget is reached), so the merges see the whole corpus, not its beginning."""
    import numpy as np

    from bigtrain.data.sampler import IndexPermutation

    budget, n = cfg.tokenizer_sample_bytes or MAX_TRAIN_CHARS, len(docs)
    if n == 0:
        return
    if docs.data.nbytes <= budget:  # the whole table (a selection of it too) fits: every document, in order
        yield from bpe_text_batches(docs, cfg, task)
        return
    order = IndexPermutation(n, seed=0, epoch=0)
    chunks = (docs.select(np.sort(order(np.arange(start, min(start + chunk, n))))) for start in range(0, n, chunk))
    yield from _capped((texts for rows in chunks for texts in bpe_text_batches(rows, cfg, task, batch_rows=chunk)), cfg)
