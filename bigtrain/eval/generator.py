"""A decoder ready to generate (`Generator`) and where it comes from: any run, checkpoint or Hugging Face folder.

`load_generator` builds the decoder of SOURCE in eval mode (a run dir means its newest complete
checkpoint; any strategy's format; an HF folder through bigtrain/interop, so the numerics are the
import's), with its tokenizer.json, end-of-sequence ids and chat template; `live_generator` wraps a model
being trained and its run dir's tokenizer (in-loop lm-eval).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError

if TYPE_CHECKING:
    import tokenizers

    from bigtrain.models.transformer import Transformer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Generator:
    """A decoder ready to generate, with what its text needs."""

    model: Transformer
    tokenizer: tokenizers.Tokenizer
    eos_ids: tuple[int, ...]
    folder: Path  # where the weights and tokenizer came from
    chat_template: str | None = None
    template_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for the template
    # ids >= this are never picked: the rows bigtrain padded the embedding with (an imported model's vocab is its own)
    vocab_limit: int | None = None


def load_generator(source: str | Path, *, dtype: str = "fp32", device: str = "cpu") -> Generator:
    """The model and tokenizer of a run dir (newest complete checkpoint), a checkpoint folder, an HF folder
    or a hub id (through the Hugging Face cache)."""
    from bigtrain import checkpoint
    from bigtrain.interop.hf_config import is_hf_folder, looks_like_hf_folder, read_config
    from bigtrain.interop.hub import local_folder

    if dtype not in DTYPES:
        raise UserError(f"generate --dtype: unknown dtype '{dtype}' — choose one of {', '.join(DTYPES)}")
    where = local_folder(str(source), where="generate")
    if not where.exists():
        raise UserError(f"generate: no such run dir, checkpoint or Hugging Face folder '{source}'")
    if is_hf_folder(where):
        return _load(where, _hf_model_config(where), hf=True, dtype=DTYPES[dtype], device=device)
    if looks_like_hf_folder(where):
        read_config(where, where="generate")  # raises: HF weights without a config.json
    if (where / checkpoint.MANIFEST).is_file():
        checkpoint.verify(where)
        folder = where
    elif checkpoint.checkpoints_dir(where).is_dir():
        newest = checkpoint.find_resume_checkpoint("auto", where, warn=lambda m: print(m, file=sys.stderr))
        if newest is None:
            raise UserError(f"generate: no complete checkpoint in '{checkpoint.checkpoints_dir(where)}'")
        folder = newest
    else:
        raise UserError(f"generate: '{source}' is not a run dir, checkpoint or Hugging Face folder "
                        f"(no checkpoints/, manifest.json or config.json in it)")
    return _load(folder, _checkpoint_model_config(folder), hf=False, dtype=DTYPES[dtype], device=device)


def _hf_model_config(folder: Path):
    from bigtrain.config import Config, DataConfig, ModelConfig
    from bigtrain.interop.hf_config import with_hf_model

    # seq_len 1: a sliding window caps model.max_seq_len, and so the generated length, instead
    return with_hf_model(Config(model=ModelConfig(init_from=str(folder)), data=DataConfig(seq_len=1))).model


def _checkpoint_model_config(folder: Path):
    from bigtrain.config import build_config

    cfg = build_config(safe_load.read_yaml(folder / "config.yaml"), where=str(folder / "config.yaml"))
    if cfg.model.arch != "decoder" or cfg.task.data_task == "classification":
        what = "an encoder" if cfg.model.arch != "decoder" else "a classifier"
        raise UserError(f"generate: {folder} holds {what} (task {cfg.task.name}) — only a decoder language model "
                        f"generates text")
    # A LoRA run's weights are read with the adapters merged in (checkpoint.open_init_reader): the plain model.
    return dataclasses.replace(cfg.model, lora=None)


def _load(folder: Path, model_cfg, *, hf: bool, dtype: torch.dtype, device: str) -> Generator:
    from bigtrain.checkpoint import load_init_weights
    from bigtrain.interop.chat_template import read_chat_template, special_tokens
    from bigtrain.interop.hf_weights import open_hf_weights
    from bigtrain.models import build_model
    from bigtrain.models.layers import RotaryEmbedding
    from bigtrain.checkpoint import open_weights

    tokenizer_path = find_tokenizer_file(folder)
    tokenizer = _read_tokenizer(tokenizer_path)
    reader = open_hf_weights(folder) if hf else open_weights(folder)
    shapes = reader.tensors()
    if "tok_emb.weight" not in shapes:
        raise UserError(f"generate: {folder} has no tensor 'tok_emb.weight' — not a bigtrain decoder checkpoint")
    vocab_size = shapes["tok_emb.weight"][1][0]

    # Built on the meta device and filled once from the weights: no random init of a model about to be overwritten.
    model = build_model(model_cfg, vocab_size, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    model._tie_weights()  # to_empty gave the tied head its own Parameter
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()  # non-persistent: not in the weights
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report, weights = load_init_weights(folder, expected, arch="decoder")
    if report["new"]:
        raise UserError(f"generate: {folder} lacks tensor(s) {', '.join(report['new'][:3])} of its model")
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)

    eos_ids = (_hf_eos_ids(folder) if hf else ()) or _eos_ids(tokenizer)
    limit = tokenizer.get_vocab_size()
    template_folder = tokenizer_path.parent
    return Generator(model=model, tokenizer=tokenizer, eos_ids=eos_ids, folder=folder,
                     chat_template=read_chat_template(template_folder), template_tokens=special_tokens(template_folder),
                     vocab_limit=limit if model_cfg.vocab_size is None and limit < vocab_size else None)


def _eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's end-of-document token; BERT's [SEP], the last candidate, ends no generation."""
    from bigtrain.data.tokenizer import EOS_CANDIDATES

    return tuple(i for i in (tokenizer.token_to_id(t) for t in EOS_CANDIDATES if t != "[SEP]") if i is not None)[:1]


def live_generator(model, run_dir: Path) -> Generator:
    """A Generator over a model being trained (any strategy's module) and its run dir's tokenizer: what
    in-loop lm-eval scores (bigtrain/eval/lm_eval.InLoopTasks)."""
    from bigtrain.interop.chat_template import read_chat_template, special_tokens

    tokenizer_path = find_tokenizer_file(Path(run_dir))
    tokenizer = _read_tokenizer(tokenizer_path)
    return Generator(model=model, tokenizer=tokenizer, eos_ids=_eos_ids(tokenizer), folder=Path(run_dir),
                     chat_template=read_chat_template(tokenizer_path.parent),
                     template_tokens=special_tokens(tokenizer_path.parent))


def find_tokenizer_file(folder: Path) -> Path:
    """tokenizer.json of the folder, or of the run dir a checkpoint folder sits in."""
    for candidate in (folder / TOKENIZER_FILE, folder.parent.parent / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    raise UserError(f"generate: {folder} has no {TOKENIZER_FILE} — generate needs the model's tokenizer beside it")


def _read_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # JSON or schema errors from the Rust side
        raise UserError(f"generate: '{path}' is not a valid tokenizer.json ({str(e).strip() or type(e).__name__})") from None


def _hf_eos_ids(folder: Path) -> tuple[int, ...]:
    """eos_token_id of generation_config.json, else of config.json (an int or a list), as transformers reads it."""
    for name in ("generation_config.json", "config.json"):
        try:
            eos = safe_load.read_json(folder / name).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()
