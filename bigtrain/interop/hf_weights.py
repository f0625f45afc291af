"""Hugging Face tensors ↔ bigtrain tensors: names and layouts per family, read and written one at a time.

The map (`tensor_map`) is data: each bigtrain tensor is one HF tensor as is ("copy"), transposed
("t": GPT-2's Conv1D stores [in, out]), or several HF tensors stacked on dim 0 ("cat": q/k/v into
`attn.qkv`, gate/up into `mlp.in_proj`). `HFWeights` reads an HF folder (model.safetensors, a sharded
index, or pytorch_model.bin through `torch.load(weights_only=True)`) as a WeightsReader under bigtrain's
names, for `model.init_from`; `HFExportWeights` is the inverse over any strategy's checkpoint reader,
and `write_hf_weights` streams it into model.safetensors (or shards plus an index above a size limit).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError
from bigtrain.interop.safetensors_file import SAFETENSORS_DTYPES, write_safetensors
from bigtrain.interop.hf_encoders import (BASE_PREFIX, ENCODER_CLASSES, HEAD_PREFIXES, TIED_DUPLICATES,
                                          encoder_tensor_map, hf_num_labels, is_encoder_family)
from bigtrain.models.presets import ModelSpec

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# HF tensors that are buffers, not weights (GPT-2's causal mask, old Llama's inv_freq, BERT's position and
# token-type ids): never mapped.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids"
                     r"|embeddings\.token_type_ids)$")
TIED_HEADS = ("lm_head.weight", "mlm_head.proj.weight")  # bigtrain's output projections, tied or not
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tensor_map(family: str, spec: ModelSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    """bigtrain name -> (op, HF names) for every tensor of `spec`'s model as HF class `family` (an encoder's
    head as spec.head says). A tied lm_head maps to the HF embedding (HF folders store it once)."""
    entries: dict[str, tuple[str, tuple[str, ...]]] = {}

    def add(ours: str, op: str, *theirs: str) -> None:
        entries[ours] = (op, theirs)

    if is_encoder_family(family):
        encoder_tensor_map(family, spec, add)
        return entries
    if family == "gpt2":
        add("tok_emb.weight", "copy", "transformer.wte.weight")
        add("pos_emb.weight", "copy", "transformer.wpe.weight")
        for i in range(spec.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                add(f"{b}{ours}.weight", "copy", f"{h}{theirs}.weight")
                add(f"{b}{ours}.bias", "copy", f"{h}{theirs}.bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out_proj", "attn.c_proj"),
                                 ("mlp.in_proj", "mlp.c_fc"), ("mlp.out_proj", "mlp.c_proj")):
                add(f"{b}{ours}.weight", "t", f"{h}{theirs}.weight")
                add(f"{b}{ours}.bias", "copy", f"{h}{theirs}.bias")
        add("norm.weight", "copy", "transformer.ln_f.weight")
        add("norm.bias", "copy", "transformer.ln_f.bias")
        embedding = "transformer.wte.weight"
    else:
        add("tok_emb.weight", "copy", "model.embed_tokens.weight")
        for i in range(spec.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            add(f"{b}attn_norm.weight", "copy", f"{h}input_layernorm.weight")
            add(f"{b}mlp_norm.weight", "copy", f"{h}post_attention_layernorm.weight")
            qkv = [f"{h}self_attn.{p}_proj" for p in "qkv"]
            add(f"{b}attn.qkv.weight", "cat", *(f"{name}.weight" for name in qkv))
            if spec.qkv_bias:
                add(f"{b}attn.qkv.bias", "cat", *(f"{name}.bias" for name in qkv))
            add(f"{b}attn.out_proj.weight", "copy", f"{h}self_attn.o_proj.weight")
            if spec.qk_norm:
                add(f"{b}attn.q_norm.weight", "copy", f"{h}self_attn.q_norm.weight")
                add(f"{b}attn.k_norm.weight", "copy", f"{h}self_attn.k_norm.weight")
            add(f"{b}mlp.in_proj.weight", "cat", f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight")
            add(f"{b}mlp.out_proj.weight", "copy", f"{h}mlp.down_proj.weight")
            if spec.bias:
                add(f"{b}attn.out_proj.bias", "copy", f"{h}self_attn.o_proj.bias")
                add(f"{b}mlp.in_proj.bias", "cat", f"{h}mlp.gate_proj.bias", f"{h}mlp.up_proj.bias")
                add(f"{b}mlp.out_proj.bias", "copy", f"{h}mlp.down_proj.bias")
        add("norm.weight", "copy", "model.norm.weight")
        embedding = "model.embed_tokens.weight"
    add("lm_head.weight", "copy", embedding if spec.tie_embeddings else "lm_head.weight")
    return entries


def _convert_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if op == "t":
        return tuple(reversed(shapes[0]))
    if op == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


# --------------------------------------------------------------------------- reading an HF folder


class _HFFiles:
    """The raw tensors of an HF folder by their HF names: safetensors (one file or an index) or torch .bin."""

    def __init__(self, folder: Path, where: str):
        self.folder, self.where = folder, where
        self.handles: dict[str, object] = {}
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (folder / index).is_file():
                try:
                    self.weight_map = dict(json.loads((folder / index).read_text())["weight_map"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise UserError(f"{where}: cannot read {folder / index} (needs a weight_map)") from None
                return
        for file in ("model.safetensors", "pytorch_model.bin"):
            if (folder / file).is_file():
                self.weight_map = {name: file for name in self._open(file).keys()}
                return
        raise UserError(f"{where}: {folder} has no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin")

    def _open(self, file: str):
        if file not in self.handles:
            path = safe_load.inside(self.folder, file, where=f"{self.where}: {self.folder}'s weights index")
            if not path.is_file():
                raise UserError(f"{self.where}: {path} is missing (listed in the folder's index)")
            try:
                if file.endswith(".safetensors"):
                    from safetensors import safe_open

                    self.handles[file] = safe_open(str(path), framework="pt")
                else:  # plain tensors only (bigtrain/core/safe_load.py): anything that could run code is refused
                    self.handles[file] = safe_load.torch_file(path, where=f"{self.where}: {path}", mmap=True)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{self.where}: cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        return self.handles[file]

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        handle = self._open(self.weight_map[name])
        if isinstance(handle, dict):
            return handle[name].dtype, tuple(handle[name].shape)
        piece = handle.get_slice(name)
        return _SAFETENSORS_TO_TORCH[piece.get_dtype()], tuple(piece.get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.weight_map[name])
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)


_SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class HFWeights:
    """A WeightsReader of an HF folder under bigtrain's tensor names (`model.init_from`).

    HF names may lack the base-model prefix (a GPT2Model / LlamaModel / BertModel save); buffers are skipped.
    A tensor the folder holds that bigtrain does not map, or one the model needs that the folder
    lacks, is a one-line UserError: importing it otherwise would give a different model.
    """

    def __init__(self, folder: str | Path, family: str, spec: ModelSpec, where: str = "model.init_from"):
        self.folder, self.where = Path(folder).expanduser(), where
        self.arch = spec.arch  # "decoder" | "encoder": what load_init_weights checks model.arch against
        self.files = _HFFiles(self.folder, where)
        prefix = BASE_PREFIX.get(family, "transformer." if family == "gpt2" else "model.")
        heads = HEAD_PREFIXES.get(family, ("lm_head.",))
        self.names = {}  # canonical HF name -> name in the files
        for name in self.files.weight_map:
            if IGNORED.search(name):
                continue
            canonical = name if name.startswith((prefix, *heads)) else prefix + name
            self.names[canonical] = name
        self.map = tensor_map(family, spec)
        mapped = {theirs for _, names in self.map.values() for theirs in names}
        if spec.tie_embeddings:
            mapped.add("lm_head.weight")  # a tied head stored anyway: the embedding is what counts
        mapped.update(TIED_DUPLICATES.get(family, ()))  # BERT's decoder bias is its predictions bias
        unmapped = sorted(set(self.names) - mapped)
        if unmapped:
            raise UserError(f"{where}: {self.folder} holds tensor '{unmapped[0]}' ({len(unmapped)} unmapped in all), "
                            f"which the model its config.json describes does not have — it cannot be imported exactly")
        for ours, (_, theirs) in self.map.items():
            missing = [name for name in theirs if name not in self.names]
            if missing:
                raise UserError(f"{where}: {self.folder} has no tensor '{missing[0]}' (bigtrain's '{ours}') — "
                                f"the weights do not match config.json")

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out = {}
        for ours, (op, theirs) in self.map.items():
            metas = [self.files.meta(self.names[name]) for name in theirs]
            out[ours] = (metas[0][0], _convert_shape(op, [shape for _, shape in metas]))
        return out

    def get(self, name: str) -> torch.Tensor:
        op, theirs = self.map[name]
        parts = [self.files.get(self.names[n]) for n in theirs]
        if op == "t":
            return parts[0].t().contiguous()
        if op == "cat":
            return torch.cat(parts, dim=0)
        return parts[0]


def open_hf_weights(folder: str | Path, where: str = "model.init_from") -> HFWeights:
    """HFWeights of an HF folder, its family and shape read from its config.json."""
    from bigtrain.config import ModelConfig
    from bigtrain.interop.hf_config import family_of, model_keys, read_config
    from bigtrain.models.presets import resolve_spec

    config = read_config(folder, where)
    keys = model_keys(config, where)
    keys.pop("sliding_window")
    vocab_size = keys.pop("vocab_size")
    head = next((ENCODER_CLASSES[name][1] for name in config.get("architectures") or [] if name in ENCODER_CLASSES),
                "lm")  # the head the folder holds
    spec = resolve_spec(ModelConfig(**keys), vocab_size, head=head,
                        num_labels=hf_num_labels(config) if head == "classify" else None)
    return HFWeights(folder, family_of(config, where), spec, where)


# --------------------------------------------------------------------------- writing an HF folder


class HFExportWeights:
    """A WeightsReader over a bigtrain checkpoint reader, under HF names and layouts, cast to `dtype`.
    A tied head is left out (HF ties it on load). The last bigtrain tensor read is kept, so q/k/v
    (or gate/up) slices of one fused tensor cost one read."""

    def __init__(self, reader, family: str, spec: ModelSpec, dtype: torch.dtype):
        self.reader, self.dtype = reader, dtype
        saved = reader.tensors()
        self.sources: dict[str, tuple[str, str, int, int]] = {}  # HF name -> (ours, op, start, stop) on dim 0
        for ours, (op, theirs) in tensor_map(family, spec).items():
            if ours in TIED_HEADS and spec.tie_embeddings:
                continue
            if ours not in saved:
                raise UserError(f"export --format hf: the checkpoint has no tensor '{ours}' — it does not hold the "
                                f"model its config.yaml describes")
            sizes = self._split_sizes(ours, spec, len(theirs))
            start = 0
            for name, size in zip(theirs, sizes):
                self.sources[name] = (ours, op, start, start + size)
                start += size
        self._cached: tuple[str, torch.Tensor] | None = None

    @staticmethod
    def _split_sizes(ours: str, spec: ModelSpec, parts: int) -> list[int]:
        if parts == 1:
            return [-1]
        if ".qkv." in ours:
            hd = spec.head_dim
            return [spec.n_heads * hd, spec.n_kv_heads * hd, spec.n_kv_heads * hd]
        return [spec.d_ff, spec.d_ff]  # gate, up

    def _read(self, ours: str) -> torch.Tensor:
        if self._cached is None or self._cached[0] != ours:
            self._cached = None  # drop the previous one before reading the next
            self._cached = (ours, self.reader.get(ours).detach().to("cpu"))
        return self._cached[1]

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        saved = self.reader.tensors()
        out = {}
        for name, (ours, op, start, stop) in self.sources.items():
            shape = tuple(saved[ours][1])
            if stop > 0:
                shape = (stop - start, *shape[1:])
            out[name] = (self.dtype, tuple(reversed(shape)) if op == "t" else shape)
        return out

    def get(self, name: str) -> torch.Tensor:
        ours, op, start, stop = self.sources[name]
        tensor = self._read(ours)
        if stop > 0:
            tensor = tensor[start:stop]
        if op == "t":
            tensor = tensor.t()
        return tensor.to(self.dtype).contiguous()


class _Subset:
    def __init__(self, reader, names: list[str]):
        self.reader, self.names = reader, names

    def tensors(self):
        every = self.reader.tensors()
        return {name: every[name] for name in self.names}

    def get(self, name):
        return self.reader.get(name)


def write_hf_weights(out: Path, reader: HFExportWeights, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000K-of-0000N.safetensors + model.safetensors.index.json when the
    tensors pass `max_shard_bytes` (a shard holds at least one tensor). Streamed: one tensor in memory."""

    shards: list[list[str]] = [[]]
    size, total = 0, 0
    for name, (dtype, shape) in reader.tensors().items():
        nbytes = dtype.itemsize * math.prod(int(size) for size in shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", reader, metadata={"format": "pt"})
        return ["model.safetensors"]
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, names in zip(files, shards):
        write_safetensors(out / file, _Subset(reader, names), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return files

