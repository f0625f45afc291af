"""Hugging Face config.json ↔ bigtrain's model keys, for the families that map exactly.

In: `model_keys(config)` reads a GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM or Qwen3ForCausalLM config.json into the recipe's `model.*` keys (activations,
norms, eps, RoPE theta and llama3 scaling, biases, tying, head_dim), and a BertForMaskedLM,
BertForSequenceClassification or RobertaForMaskedLM one through `hf_encoders`; `with_hf_model(cfg)` puts them
into a recipe whose `model.init_from` is an HF folder, refusing a recipe key that contradicts them.
Out: `export_family(spec)` names the HF class that expresses a ModelSpec exactly, and
`hf_config(spec, ...)` writes its config.json by hand (no transformers needed).
Anything that does not map is a one-line UserError naming it — never a silently different model.
Torch-free: `bigtrain launch` and `bigtrain check` use it before any process starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from bigtrain.core.errors import UserError
from bigtrain.interop.hub import local_folder
from bigtrain.interop.hf_encoders import (ENCODER_CLASSES, encoder_export_class, encoder_hf_config, encoder_keys,
                                          is_encoder_family)

if TYPE_CHECKING:
    from bigtrain.config import Config
    from bigtrain.models.presets import ModelSpec

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

# `architectures` entry -> family; the family decides the config keys and the tensor names.
FAMILIES = {
    "GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    **{name: family for name, (family, _) in ENCODER_CLASSES.items()},
}
# family -> (architectures entry, model_type) written on export (mistral exports as llama: same model).
EXPORT_CLASSES = {"gpt2": ("GPT2LMHeadModel", "gpt2"), "llama": ("LlamaForCausalLM", "llama"),
                  "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}
GPT2_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # -> gelu_approximate
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The class defaults of keys save_pretrained may leave out (transformers' *Config defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
                 tie_word_embeddings=True),
    "llama": dict(hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02),
    "mistral": dict(hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096, attention_dropout=0.0, initializer_range=0.02),
    "qwen2": dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28, attention_dropout=0.0,
                  initializer_range=0.02),
    "qwen3": dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  attention_dropout=0.0, initializer_range=0.02, head_dim=128),
}

# Model keys a recipe may set freely with an HF init_from: training choices, not the model's function.
FREE_KEYS = ("dropout", "init_std")


# --------------------------------------------------------------------------- reading a folder


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json, and not a bigtrain checkpoint or run dir."""
    folder = Path(path).expanduser()
    return ((folder / CONFIG_FILE).is_file() and not (folder / "manifest.json").exists()
            and not (folder / "checkpoints").is_dir())


def looks_like_hf_folder(path: str | Path) -> bool:
    """HF weights files or config.json, but not a bigtrain checkpoint or run dir (for a clear error)."""
    folder = Path(path).expanduser()
    return (folder.is_dir() and not (folder / "manifest.json").exists() and not (folder / "checkpoints").is_dir()
            and any((folder / name).is_file() for name in (CONFIG_FILE, *WEIGHT_FILES)))


def read_config(folder: str | Path, where: str = "model.init_from") -> dict:
    """config.json of an HF folder as a dict (a missing or unreadable one is a UserError)."""
    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{where}: {Path(folder)} has no {CONFIG_FILE} — a Hugging Face model folder needs one "
                        f"(save it with save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {path} must hold a JSON object")
    return config


def family_of(config: dict, where: str) -> str:
    """The family of an HF config (from `architectures`), or a UserError listing the ones that map."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in FAMILIES:
            return FAMILIES[name]
    raise UserError(f"{where}: config.json architectures {architectures} is not supported — bigtrain imports "
                    f"{', '.join(FAMILIES)}")


# --------------------------------------------------------------------------- config.json -> model keys


def model_keys(config: dict, where: str = "model.init_from") -> dict[str, Any]:
    """The recipe's model keys (arch, vocab_size and every ModelSpec field that matters) for an HF config.

    Also "sliding_window": the attention window of the model (None: full attention), which the
    caller checks against data.seq_len. Raises a UserError naming any setting that does not map.
    """
    family = family_of(config, where)
    if is_encoder_family(family):
        return encoder_keys(family, config, refuse=lambda *a: _refuse(where, *a),
                            need=lambda key: _need(config, key, family, where))
    c = {**_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None or k in ("n_inner", "sliding_window")}}

    def refuse(key: str, value, wanted: str) -> None:
        _refuse(where, key, value, wanted)

    def need(key: str):
        return _need(c, key, family, where)

    keys: dict[str, Any] = {"arch": "decoder", "vocab_size": need("vocab_size")}
    keys.update(_gpt2_keys(c, refuse, need) if family == "gpt2" else _swiglu_keys(c, family, refuse, need))
    return keys


def _gpt2_keys(c: dict, refuse, need) -> dict[str, Any]:
    """GPT-2's ModelSpec fields from its (defaults-filled) config `c`."""
    act = c["activation_function"]
    if act not in GPT2_ACTIVATIONS:
        refuse("activation_function", act, f"one of {', '.join(GPT2_ACTIVATIONS)}")
    for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if c.get(key, wanted) != wanted:
            refuse(key, c[key], f"needs {json.dumps(wanted)}")
    dropouts = {float(c[k]) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    d = need("n_embd")
    return dict(n_layers=need("n_layer"), d_model=d, n_heads=need("n_head"), n_kv_heads=need("n_head"),
                d_ff=c["n_inner"] or 4 * d, max_seq_len=c["n_positions"], norm="layernorm", position="learned",
                mlp="gelu", gelu_approximate=GPT2_ACTIVATIONS[act], tie_embeddings=bool(c["tie_word_embeddings"]),
                bias=True, qkv_bias=True, qk_norm=False, d_head=None, rope_scaling=None,
                dropout=dropouts.pop() if len(dropouts) == 1 else None, norm_eps=float(c["layer_norm_epsilon"]),
                init_std=float(c["initializer_range"]), sliding_window=None)


def _swiglu_keys(c: dict, family: str, refuse, need) -> dict[str, Any]:
    """The ModelSpec fields of a Llama / Mistral / Qwen2 / Qwen3 config `c` (defaults filled): SwiGLU, RMSNorm, RoPE."""
    if c["hidden_act"] != "silu":
        refuse("hidden_act", c["hidden_act"], "SwiGLU needs silu")
    d, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = c.get("head_dim") or d // heads
    theta, scaling = _rope(c, refuse)
    if family == "qwen2":
        bias, qkv_bias = False, True
    elif family == "qwen3":
        if c["attention_bias"]:
            refuse("attention_bias", True, "Qwen3 with biases on q/k/v/o but not the MLP")
        bias, qkv_bias = False, False
    else:
        attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            refuse("attention_bias", attention_bias, f"biases must be on every Linear or none; mlp_bias={mlp_bias}")
        bias = qkv_bias = attention_bias
    window = _sliding_window(family, c)
    max_seq_len = c["max_position_embeddings"] if window is None else min(c["max_position_embeddings"], window)
    return dict(n_layers=need("num_hidden_layers"), d_model=d, n_heads=heads,
                n_kv_heads=c.get("num_key_value_heads") or heads, d_ff=need("intermediate_size"),
                max_seq_len=max_seq_len, norm="rmsnorm", position="rope", mlp="swiglu", gelu_approximate="tanh",
                tie_embeddings=bool(c["tie_word_embeddings"]), bias=bias, qkv_bias=qkv_bias,
                qk_norm=family == "qwen3", d_head=None if head_dim * heads == d else head_dim, rope_theta=theta,
                rope_scaling=scaling, dropout=float(c["attention_dropout"]), norm_eps=float(c["rms_norm_eps"]),
                init_std=float(c["initializer_range"]), sliding_window=window)


def _refuse(where: str, key: str, value, wanted: str) -> None:
    raise UserError(f"{where}: config.json {key}={json.dumps(value)} does not map to a bigtrain model "
                    f"({wanted}) — it cannot be imported exactly")


def _need(c: dict, key: str, family: str, where: str):
    if c.get(key) is None:
        raise UserError(f"{where}: config.json has no '{key}' (needed for {family})")
    return c[key]


def _rope(c: dict, refuse) -> tuple[float, tuple | None]:
    """(rope_theta, llama3 scaling or None) from rope_parameters (transformers 5) or rope_scaling + rope_theta."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        refuse("rope_parameters", params, "one RoPE for every layer")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse("partial_rotary_factor", partial, "RoPE over the whole head")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        refuse("rope_type", rope_type, "plain RoPE or llama3 scaling")
    try:
        scaling = (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                   int(params.get("original_max_position_embeddings", c["max_position_embeddings"])))
    except KeyError as e:
        refuse("rope_parameters", params, f"llama3 scaling needs {e.args[0]}")
    return theta, scaling


def _sliding_window(family: str, c: dict) -> int | None:
    """The attention window some layer uses (None: every layer attends to the whole sequence)."""
    window = c.get("sliding_window")
    if family == "mistral" or window is None:
        return window
    if family in ("qwen2", "qwen3"):
        layer_types = c.get("layer_types")
        if layer_types is not None:
            return window if "sliding_attention" in layer_types else None
        return window if c["use_sliding_window"] and c["num_hidden_layers"] > c["max_window_layers"] else None
    return None


def with_hf_model(cfg: Config, *, download: bool = True) -> Config:
    """cfg with its model keys read from the config.json of `model.init_from` when that is an HF folder or
    hub id (unchanged otherwise, and for a hub id not in the cache when download=False). A recipe key that
    contradicts config.json is a UserError naming both values; model.max_seq_len may be set lower than a
    RoPE model's max_position_embeddings (the tables get smaller), and dropout / init_std are the recipe's
    to choose. Idempotent: the result passes through unchanged."""
    from bigtrain.models.presets import PRESETS

    m = cfg.model
    folder = local_folder(m.init_from, m.init_revision, download=download) if m.init_from else None
    if folder is None or not is_hf_folder(folder):
        return cfg
    keys = model_keys(read_config(folder), where="model.init_from")
    window = keys.pop("sliding_window")
    source = f"{folder / CONFIG_FILE}"
    if window is not None and cfg.data.seq_len > window:
        raise UserError(f"model.init_from: {source} has sliding_window={window}, shorter than data.seq_len="
                        f"{cfg.data.seq_len} — bigtrain attends to the whole sequence; set data.seq_len <= {window}")
    if keys["dropout"] is None and m.dropout is None:
        raise UserError(f"model.init_from: {source} has different resid_pdrop, embd_pdrop and attn_pdrop — "
                        f"set model.dropout (bigtrain has one dropout)")
    arch = keys.pop("arch")
    if m.arch != arch:
        raise UserError(f"model.arch={m.arch} contradicts {source}, {'an' if arch == 'encoder' else 'a'} {arch} "
                        f"— set model.arch: {arch}")
    if m.preset != "debug":  # debug is the default: no preset asked for
        for name, value in PRESETS.get(m.preset, {}).items():
            if name in keys and name not in FREE_KEYS and value is not None and value != keys[name]:
                raise UserError(f"model.preset={m.preset} has {name}={_show(value)} but {source} gives "
                                f"{name}={_show(keys[name])} — drop model.preset (the shape comes from config.json)")
    values = {}
    for name, theirs in keys.items():
        ours = getattr(m, name)
        if name in FREE_KEYS:
            values[name] = theirs if ours is None else ours
        elif ours is None or _effective(name, ours, keys) == _effective(name, theirs, keys):
            values[name] = theirs
        elif name == "max_seq_len" and keys["position"] == "rope" and ours <= theirs:
            values[name] = ours  # a shorter limit of use: smaller RoPE tables, the same model
        else:
            raise UserError(f"model.{name}={_show(ours)} contradicts {source}, which gives {name}={_show(theirs)} "
                            f"— drop model.{name} (the shape comes from config.json)")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **values))


def _effective(name: str, value, keys: dict):
    """A key's meaning, for comparing: d_head None means d_model // n_heads; tuples and lists alike."""
    if name == "d_head" and value is None:
        return keys["d_model"] // keys["n_heads"]
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return value


def _show(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


# --------------------------------------------------------------------------- ModelSpec -> config.json


def export_family(spec: ModelSpec) -> str:
    """The HF family that computes exactly what `spec` does, or a UserError naming what does not map."""
    def refuse(what: str) -> NoReturn:
        raise UserError(f"export --format hf: {what} has no exact Hugging Face class — bigtrain exports "
                        f"GPT-2 style (layernorm, learned positions, gelu, biases) and Llama / Qwen2 / Qwen3 style "
                        f"(rmsnorm, rope, swiglu) decoders, and BERT / RoBERTa style encoders (norm_position post, "
                        f"embedding_norm, type_vocab_size, learned positions, gelu, biases)")

    if spec.arch == "encoder":
        return encoder_export_class(spec, refuse)
    if spec.arch != "decoder":
        refuse(f"model.arch={spec.arch}")
    if spec.head != "lm":
        refuse(f"a {spec.head} head")
    if spec.norm == "layernorm" and spec.position == "learned" and spec.mlp == "gelu":
        for bad, what in ((not spec.bias, "bias=false with GPT-2 style"),
                          (not spec.qkv_bias, "qkv_bias=false with GPT-2 style"),
                          (spec.qk_norm, "qk_norm with GPT-2 style"),
                          (spec.n_kv_heads != spec.n_heads, f"n_kv_heads={spec.n_kv_heads} (grouped-query) with GPT-2 style"),
                          (spec.d_head not in (None, spec.d_model // spec.n_heads), f"d_head={spec.d_head} with GPT-2 style"),
                          (spec.d_model % spec.n_heads != 0, "d_model not divisible by n_heads with GPT-2 style")):
            if bad:
                refuse(what)
        return "gpt2"
    if spec.norm == "rmsnorm" and spec.position == "rope" and spec.mlp == "swiglu":
        if spec.d_model % spec.n_heads:
            refuse(f"d_model={spec.d_model} not divisible by n_heads={spec.n_heads}")
        if spec.qk_norm:
            if spec.bias or spec.qkv_bias:
                refuse("qk_norm with biases")
            return "qwen3"
        if spec.qkv_bias and not spec.bias:
            if spec.d_head not in (None, spec.d_model // spec.n_heads):
                refuse(f"d_head={spec.d_head} with qkv_bias")
            return "qwen2"
        if spec.bias and not spec.qkv_bias:
            refuse("bias=true with qkv_bias=false")
        return "llama"
    refuse(f"norm={spec.norm} with position={spec.position} and mlp={spec.mlp}")


def hf_config(spec: ModelSpec, family: str, *, dtype: str = "fp32", bos_id: int | None = None,
              eos_id: int | None = None, pad_id: int | None = None, labels: list | None = None) -> dict:
    """config.json for `spec` as HF class `family` (see export_family): every key the class reads.
    labels: a classifier's label names (id2label)."""
    if is_encoder_family(family):
        return {"vocab_size": spec.vocab_size, "torch_dtype": TORCH_DTYPES[dtype],
                **encoder_hf_config(spec, family, pad_id=pad_id, labels=labels),
                "bos_token_id": bos_id, "eos_token_id": eos_id}
    architecture, model_type = EXPORT_CLASSES[family]
    config: dict[str, Any] = {"architectures": [architecture], "model_type": model_type,
                              "vocab_size": spec.vocab_size, "torch_dtype": TORCH_DTYPES[dtype]}
    if family == "gpt2":
        config.update(n_positions=spec.max_seq_len, n_embd=spec.d_model, n_layer=spec.n_layers, n_head=spec.n_heads,
                      n_inner=spec.d_ff, activation_function="gelu_new" if spec.gelu_approximate == "tanh" else "gelu",
                      resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
                      layer_norm_epsilon=spec.norm_eps, initializer_range=spec.init_std, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.rope_scaling is not None:
            factor, low, high, original = spec.rope_scaling
            rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position_embeddings=int(original))
        config.update(hidden_size=spec.d_model, intermediate_size=spec.d_ff, num_hidden_layers=spec.n_layers,
                      num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                      hidden_act="silu", max_position_embeddings=spec.max_seq_len, rms_norm_eps=spec.norm_eps,
                      initializer_range=spec.init_std, attention_dropout=spec.dropout,
                      # transformers 4.x reads rope_theta + rope_scaling; 5.x reads rope_parameters (and both).
                      rope_theta=spec.rope_theta,
                      rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if spec.rope_scaling else None,
                      rope_parameters=rope)
        if family == "llama":
            config.update(attention_bias=spec.bias, mlp_bias=spec.bias)
        if family == "qwen3":
            config.update(attention_bias=False)
        if family in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.n_layers)
    config.update(tie_word_embeddings=spec.tie_embeddings, bos_token_id=bos_id, eos_token_id=eos_id,
                  pad_token_id=pad_id, use_cache=True)
    return config
