"""`bigtrain export SOURCE OUT [--format bigtrain|hf]`: the consolidated weights of any strategy's checkpoint.

--format bigtrain (the default) writes bigtrain's own folder, below. --format hf writes a Hugging Face
folder that `AutoModelForCausalLM` (decoders), `AutoModelForMaskedLM` / `AutoModelForSequenceClassification`
(BERT / RoBERTa style encoders) and `AutoTokenizer.from_pretrained` load with no extra code (`export_hf`:
config.json written from the ModelSpec, model.safetensors or shards plus an index, generation_config.json
for decoders, tokenizer.json + tokenizer_config.json); a model no HF class expresses exactly is a one-line
error. Both stream one tensor at a time.

OUT gets model.safetensors (every model tensor, full and unsharded, under its state-dict name),
config.yaml (the run's resolved recipe), tokenizer.json and, for classifiers, labels.json.
The checkpoint is read through `checkpoint.open_weights`, one tensor at a time, and the file
is written streaming (header first, then each tensor's bytes), so peak host memory is about one
shard plus the largest tensor, never the whole model.

Tied weights (the LM head sharing the token embedding) are stored under both names, as separate
copies, exactly as the model's state dict lists them, so `model.load_state_dict(load_file(...))`
works with strict=True (loading re-ties nothing: the model's own tie makes both names one tensor).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from bigtrain import checkpoint

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError
from bigtrain.interop.chat_template import TEMPLATE_FILE, TOKENIZER_CONFIG, read_tokenizer_config, special_tokens_of
from bigtrain.interop.safetensors_file import write_safetensors
from bigtrain.checkpoint.weights import open_weights

WEIGHTS_FILE = "model.safetensors"
COPIED_FILES = ("config.yaml", "tokenizer.json", "labels.json")  # labels.json: classifiers only

def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder, or a run dir's newest complete checkpoint; verified against its manifest."""
    path = Path(source).expanduser()
    if (path / checkpoint.MANIFEST).is_file():
        checkpoint.verify(path)
        return path
    if not path.exists():
        raise UserError(f"export: no such run dir or checkpoint '{source}'")
    folder = checkpoint.find_resume_checkpoint("auto", path, warn=lambda m: print(m, file=sys.stderr))
    if folder is None:
        raise UserError(f"export: no complete checkpoint in '{source}' — pass a run dir with a checkpoints/ "
                        f"folder or a checkpoint folder (step-NNNNNNN)")
    return folder


def export(source: str | Path, out: str | Path, *, ema: bool = False) -> Path:
    """Write OUT/model.safetensors + config.yaml + tokenizer.json (+ labels.json) from checkpoint `source`
    (`ema`: its EMA weights, optim.ema_decay)."""
    folder = find_checkpoint(source)
    out = Path(out).expanduser()
    reader = open_weights(folder, ema=ema)  # first: a refused checkpoint leaves no output folder behind
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, reader, metadata={"format": "pt", "source": str(folder)})
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    return out


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB"
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
ENCODER_TOKENS = {"cls": ("[CLS]", "<s>", "<|cls|>"), "sep": ("[SEP]", "</s>", "<|sep|>"),
                  "mask": ("[MASK]", "<mask>", "<|mask|>")}  # roles an MLM / classifier tokenizer_config names


def export_hf(source: str | Path, out: str | Path, *, dtype: str = "fp32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, ema: bool = False, adapter: bool = False) -> Path:
    """Write checkpoint `source` as a Hugging Face folder OUT (see the module docstring); dtype fp32|bf16|fp16;
    `ema`: its EMA weights (optim.ema_decay). A LoRA run (model.lora) is written with its adapters merged into
    the base weights, or (`adapter`) as a PEFT adapter folder only (`export_peft_adapter`)."""
    from bigtrain.config import build_config
    from bigtrain.interop.hf_config import export_family
    from bigtrain.interop.hf_weights import DTYPES, SAFETENSORS_INDEX, HFExportWeights, write_hf_weights
    from bigtrain.models import resolve_model_spec

    if dtype not in DTYPES:
        raise UserError(f"export --dtype: unknown dtype '{dtype}' — choose one of {', '.join(DTYPES)}")
    folder = find_checkpoint(source)
    reader = open_weights(folder, ema=ema)
    saved = reader.tensors()
    if "tok_emb.weight" not in saved:
        raise UserError(f"export --format hf: {folder} has no tensor 'tok_emb.weight' — not a bigtrain model checkpoint")
    cfg = build_config(safe_load.read_yaml(folder / "config.yaml"), where=str(folder / "config.yaml"))
    classify = "classifier.weight" in saved
    if classify and cfg.model.arch != "encoder":
        raise UserError(f"export --format hf: {folder} holds a classifier head, which has no exact Hugging Face "
                        f"causal-LM class — export it with --format bigtrain")
    spec = resolve_model_spec(cfg.model, saved["tok_emb.weight"][1][0], head="classify" if classify else "lm",
                              num_labels=saved["classifier.weight"][1][0] if classify else None,
                              pooling=cfg.task.pooling)
    family = export_family(spec)
    if adapter:
        if cfg.model.lora is None:
            raise UserError(f"export --adapter: {folder} is not a LoRA run (no model.lora in its config.yaml) — "
                            f"export it without --adapter")
        return export_peft_adapter(reader, cfg, spec, family, Path(out).expanduser(), DTYPES[dtype])
    if cfg.model.lora is not None:  # the plain model: adapters merged into the weights they adapt
        from bigtrain.models.lora import MergedLoRAWeights

        reader = MergedLoRAWeights(reader, cfg.model.lora.scaling)
    labels = safe_load.read_json(folder / "labels.json") if classify and (folder / "labels.json").is_file() else None

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_hf_side_files(folder, out, spec, family, dtype, labels)
    for stale in [*out.glob("model*.safetensors"), out / SAFETENSORS_INDEX]:  # an earlier export's shards
        stale.unlink(missing_ok=True)
    write_hf_weights(out, HFExportWeights(reader, family, spec, DTYPES[dtype]), max_shard_bytes)
    return out


def _write_hf_side_files(folder: Path, out: Path, spec, family: str, dtype: str, labels) -> None:
    """OUT's config.json, generation_config.json (decoders), tokenizer files and chat template, from checkpoint
    `folder`: everything an HF folder holds but its weights."""
    from bigtrain.interop.hf_config import hf_config

    encoder = spec.arch == "encoder"
    source_config = read_tokenizer_config(folder)  # an imported model's tokenizer settings, carried by the run
    tokens = find_special_tokens(folder / "tokenizer.json", encoder=encoder, named=source_config)
    ids = {f"{role}_token_id": token_id for role, (_, token_id) in tokens.items()}
    (out / "config.json").write_text(json.dumps(hf_config(spec, family, dtype=dtype, bos_id=ids.get("bos_token_id"),
                                                          eos_id=ids.get("eos_token_id"),
                                                          pad_id=ids.get("pad_token_id"), labels=labels), indent=2))
    (out / "generation_config.json").unlink(missing_ok=True)  # an earlier export's
    if not encoder:
        (out / "generation_config.json").write_text(json.dumps({k: v for k, v in ids.items() if v is not None},
                                                               indent=2))
    if (folder / "tokenizer.json").is_file():
        shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
        template = {"chat_template": source_config["chat_template"]} if "chat_template" in source_config else {}
        (out / TOKENIZER_CONFIG).write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.max_seq_len,
             "clean_up_tokenization_spaces": False, **{f"{role}_token": text for role, (text, _) in tokens.items()},
             **template}, indent=2))
    (out / TEMPLATE_FILE).unlink(missing_ok=True)
    if (folder / TEMPLATE_FILE).is_file():
        shutil.copyfile(folder / TEMPLATE_FILE, out / TEMPLATE_FILE)


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_peft_adapter(reader, cfg, spec, family: str, out: Path, dtype: torch.dtype) -> Path:
    """OUT/adapter_config.json + adapter_model.safetensors: the run's LoRA adapters under the Hugging Face module
    names, for `peft.PeftModel.from_pretrained(base, OUT)` on the exported (or the original) base model. A fused
    bigtrain Linear (q/k/v, gate/up) is several HF modules: each gets the same A and its rows of B, which is
    the same update (B A restricted to its rows). GPT-2's Conv1D modules are marked fan_in_fan_out. An encoder
    classifier's trained head (classifier, BERT's pooler) goes whole into PEFT's modules_to_save."""
    import re

    from bigtrain.interop.hf_weights import HFExportWeights, tensor_map
    from bigtrain.models.lora import TARGETS, TRAINED_HEADS

    encoder = spec.arch == "encoder"
    lora, entries = cfg.model.lora, tensor_map(family, spec)
    tensors: dict[str, torch.Tensor] = {}
    modules, transposed = set(), False
    for i in range(spec.n_layers):
        for path in (p for target in lora.targets for p in TARGETS[target]):
            ours = f"blocks.{i}.{path}"
            op, theirs = entries[f"{ours}.weight"]
            a, b = reader.get(f"{ours}.lora_A").detach().cpu(), reader.get(f"{ours}.lora_B").detach().cpu()
            start = 0
            for name, size in zip(theirs, HFExportWeights._split_sizes(f"{ours}.weight", spec, len(theirs))):
                module = name.removesuffix(".weight")
                stop = b.shape[0] if size < 0 else start + size
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b[start:stop].to(dtype).contiguous()
                start = stop
                # PEFT matches a target by its name's end: a decoder's are distinct per layer (self_attn.q_proj,
                # attn.c_proj); BERT's output.dense would also match attention.output.dense, so encoders name
                # each module in full.
                modules.add(module if encoder else re.sub(r"^.*?\.\d+\.", "", module))
            transposed |= op == "t"
    heads = set()
    for name in reader.tensors():
        if encoder and name.startswith(TRAINED_HEADS) and name in entries:
            op, (their_name,) = entries[name]
            tensor = reader.get(name).detach().cpu()
            tensors[f"base_model.model.{their_name}"] = (tensor.t() if op == "t" else tensor).to(dtype).contiguous()
            heads.add(their_name.rsplit(".", 1)[0])  # the module: classifier, bert.pooler.dense
    task_type = "SEQ_CLS" if spec.head == "classify" else None if encoder else "CAUSAL_LM"
    base = cfg.model.init_from if cfg.model.init_from else None
    config = {"peft_type": "LORA", "task_type": task_type, "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": sorted(modules), "fan_in_fan_out": transposed,
              "bias": "none", "inference_mode": True, "base_model_name_or_path": base,
              **({"modules_to_save": sorted(heads)} if heads else {})}
    out.mkdir(parents=True, exist_ok=True)
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    write_safetensors(out / PEFT_WEIGHTS, _Tensors(tensors), metadata={"format": "pt"})
    return out


class _Tensors:
    """A WeightsReader over a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def find_special_tokens(path: Path, encoder: bool = False, named: dict | None = None) -> dict[str, tuple[str, int]]:
    """role (bos, eos, pad; an encoder's: cls, sep, mask, pad) -> (token, id) for the special tokens of
    tokenizer.json: the ones `named` (an imported tokenizer_config.json) gives, else found by name."""
    if not path.is_file():
        return {}
    try:
        added = {t["content"]: t["id"] for t in safe_load.read_json(path).get("added_tokens", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"export --format hf: cannot read {path}") from None
    found = {}
    roles = ((*ENCODER_TOKENS.items(), ("pad", PAD_CANDIDATES)) if encoder else
             (("bos", BOS_CANDIDATES), ("eos", EOS_CANDIDATES), ("pad", PAD_CANDIDATES)))
    given = special_tokens_of(named or {})
    for role, candidates in roles:
        token = next((t for t in (given.get(f"{role}_token"), *candidates) if t in added), None)
        if token is not None:
            found[role] = (token, added[token])
    return found
