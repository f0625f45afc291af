"""Named model presets, the resolved ModelSpec, and pure size/FLOPs arithmetic on a spec.

Nothing here allocates tensors, so `bigtrain check` can report the size of an 8B model
on a laptop: `count_params(spec)` and `spec_flops_per_token(spec, seq_len)` are exact for
the modules in `bigtrain/models/`, for every arch and head (tests keep them in step with
`num_params()` of the built models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigtrain.core.errors import UserError

if TYPE_CHECKING:
    from bigtrain.config import ModelConfig

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
GELU_APPROXIMATIONS = ("tanh", "none")  # torch's F.gelu(approximate=...): GPT-2's "gelu_new" is tanh
HEADS = ("lm", "classify")  # lm: next-token (decoder) or masked-token (encoder) logits; classify: (B, K)
POOLINGS = ("first", "last")
NORM_POSITIONS = ("pre", "post")  # pre: x + f(norm(x)), a final norm (default); post: norm(x + f(x)) (BERT)
DEFAULT_POOLING = {"decoder": "last", "encoder": "first"}  # what pooling="auto" picks per arch

# Every field a preset fills; ModelConfig has an optional override of the same name for each.
SPEC_FIELDS = (
    "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
    "norm", "position", "mlp", "tie_embeddings", "bias", "dropout",
    "rope_theta", "norm_eps", "init_std",
    "d_head", "qkv_bias", "qk_norm", "rope_scaling", "gelu_approximate",
    "norm_position", "embedding_norm", "type_vocab_size", "position_offset", "pooler",
)
# The options Hugging Face families need (decoders, then BERT / RoBERTa); these defaults keep every
# older model as it was.
_COMMON = dict(d_head=None, qkv_bias=None, qk_norm=False, rope_scaling=None, gelu_approximate="tanh",
               norm_position="pre", embedding_norm=False, type_vocab_size=0, position_offset=0, pooler=False)

_GPT2_STYLE = dict(
    _COMMON, norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, bias=True,
    dropout=0.0, rope_theta=10000.0, norm_eps=1e-5, init_std=0.02,
)
_BERT_STYLE = dict(  # BERT's published hyperparameters (dropout 0.1, LayerNorm eps 1e-12)
    _COMMON, norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, bias=True,
    dropout=0.1, rope_theta=10000.0, norm_eps=1e-12, init_std=0.02,
)
_LLAMA3_STYLE = dict(
    _COMMON, norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True, bias=False,
    dropout=0.0, rope_theta=500000.0, norm_eps=1e-5, init_std=0.02,
)

PRESETS: dict[str, dict] = {
    # Tiny GPT-2-shaped model for tests and laptop smoke runs (either arch).
    "debug": dict(_GPT2_STYLE, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4,
                  d_ff=256, max_seq_len=256),
    # GPT-2 small / medium (124.4M / 354.8M params with the 50257-token GPT-2 vocabulary).
    "gpt2-124m": dict(_GPT2_STYLE, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
                      d_ff=3072, max_seq_len=1024),
    "gpt2-355m": dict(_GPT2_STYLE, n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16,
                      d_ff=4096, max_seq_len=1024),
    # Llama-3.2-1B shape (1.236B params with the 128256-token Llama 3 vocabulary).
    "llama-1b": dict(_LLAMA3_STYLE, n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8,
                     d_ff=8192, max_seq_len=2048),
    # Llama-3-8B shape (8.03B params with the 128256-token Llama 3 vocabulary).
    "llama-8b": dict(_LLAMA3_STYLE, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                     d_ff=14336, max_seq_len=8192, tie_embeddings=False),
    # BERT shapes (pre-norm; no token-type embeddings, no pooler). With BERT's 30522-token
    # vocabulary, MLM head included: bert-tiny 4.42M, bert-base 109.51M, bert-large 335.17M.
    "bert-tiny": dict(_BERT_STYLE, n_layers=2, d_model=128, n_heads=2, n_kv_heads=2,
                      d_ff=512, max_seq_len=512),
    "bert-base": dict(_BERT_STYLE, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
                      d_ff=3072, max_seq_len=512),
    "bert-large": dict(_BERT_STYLE, n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16,
                       d_ff=4096, max_seq_len=512),
}

# The arch each preset is for (model.arch must match); None: any arch.
PRESET_ARCH: dict[str, str | None] = {
    "debug": None,
    "gpt2-124m": "decoder", "gpt2-355m": "decoder", "llama-1b": "decoder", "llama-8b": "decoder",
    "bert-tiny": "encoder", "bert-base": "encoder", "bert-large": "encoder",
}


@dataclass(frozen=True)
class ModelSpec:
    """Fully resolved model shape: a preset overlaid with the recipe's overrides."""

    arch: str
    preset: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    norm: str
    position: str
    mlp: str
    tie_embeddings: bool
    bias: bool
    dropout: float
    rope_theta: float
    norm_eps: float
    init_std: float
    d_head: int | None = None  # per-head width; None: d_model // n_heads (Qwen3 sets its own)
    qkv_bias: bool = False  # biases on the q/k/v projection (resolve_spec: None -> spec.bias; Qwen2: alone)
    qk_norm: bool = False  # a norm (spec.norm, over head_dim) on each head's q and k before RoPE (Qwen3)
    rope_scaling: tuple[float, float, float, int] | None = None  # llama3: (factor, low_freq_factor,
    #   high_freq_factor, original_max_seq_len) rescale the RoPE frequencies (Llama 3.1+); None: plain RoPE
    gelu_approximate: str = "tanh"  # GeluMLP's (and the MLM head's) F.gelu(approximate=...): "tanh" | "none"
    norm_position: str = "pre"  # "pre": x + f(norm(x)) and a final norm; "post": norm(x + f(x)), no final norm (BERT)
    embedding_norm: bool = False  # a norm on the summed embeddings (BERT's embeddings.LayerNorm)
    type_vocab_size: int = 0  # rows of the token-type (segment) embedding; 0: none. One segment: row 0 is added
    position_offset: int = 0  # learned positions start at this row (RoBERTa: padding_idx + 1); the table has
    #   max_seq_len + position_offset rows
    pooler: bool = False  # classify only: Linear d -> d + tanh on the pooled token before the classifier (BERT)
    vocab_size: int | None = None  # None until a tokenizer is known; needed to build or count
    head: str = "lm"  # one of HEADS, chosen at build time (by the task), not by the recipe's model section
    num_labels: int | None = None  # classify only: classifier outputs
    pooling: str | None = None  # classify only: "first" | "last" ("auto" resolved by arch)

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads


def resolve_spec(cfg: ModelConfig, vocab_size: int | None = None, *, head: str = "lm",
                 num_labels: int | None = None, pooling: str = "auto") -> ModelSpec:
    """Overlay cfg's non-None overrides on its preset and check the result (key-named UserErrors).

    head / num_labels / pooling come from the task (see `build_model`); pooling "auto" becomes
    the arch's default (DEFAULT_POOLING) for head="classify" and None for head="lm".
    """
    if cfg.preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset '{cfg.preset}' — choose one of {', '.join(PRESETS)}")
    _check_preset_arch(cfg.preset, cfg.arch)
    values = dict(PRESETS[cfg.preset])
    if values["n_kv_heads"] == values["n_heads"] and getattr(cfg, "n_kv_heads", None) is None:
        values["n_kv_heads"] = cfg.n_heads or values["n_heads"]  # multi-head presets stay multi-head
    for name in SPEC_FIELDS:
        override = getattr(cfg, name, None)
        if override is not None:
            values[name] = override
    if values["qkv_bias"] is None:
        values["qkv_bias"] = values["bias"]
    if values["rope_scaling"] is not None:
        values["rope_scaling"] = tuple(values["rope_scaling"])
    spec = ModelSpec(arch=cfg.arch, preset=cfg.preset, vocab_size=vocab_size,
                     **_resolve_head(cfg.arch, head, num_labels, pooling), **values)
    _check(spec)
    return spec


def _check_preset_arch(preset: str, arch: str) -> None:
    wanted = PRESET_ARCH.get(preset)
    if wanted is not None and wanted != arch:
        a = {"encoder": "an", "decoder": "a"}
        fitting = [name for name, fits in PRESET_ARCH.items() if fits in (None, arch)]
        raise UserError(f"model.preset: preset '{preset}' is {a[wanted]} {wanted} preset — set model.arch: {wanted} "
                        f"(or pick {a.get(arch, 'a')} {arch} preset: {', '.join(fitting)})")


def _resolve_head(arch: str, head: str, num_labels: int | None, pooling: str) -> dict:
    """The head fields of a ModelSpec. Bad head/num_labels are the caller's bugs (ValueError);
    pooling comes from the recipe's task.pooling (UserError)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "lm":
        if num_labels is not None:
            raise ValueError("num_labels is only for head='classify'")
        return dict(head=head, num_labels=None, pooling=None)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"head='classify' needs a positive integer num_labels, got {num_labels!r}")
    if pooling == "auto":
        pooling = DEFAULT_POOLING[arch]
    if pooling not in POOLINGS:
        raise UserError(f"task.pooling: unknown pooling '{pooling}' — choose one of auto, {', '.join(POOLINGS)}")
    if pooling == "first" and arch == "decoder":
        raise UserError("task.pooling: 'first' pools a token a causal decoder computes from itself alone "
                        "— use last (or auto) with model.arch: decoder")
    return dict(head=head, num_labels=num_labels, pooling=pooling)


def _check(spec: ModelSpec) -> None:
    def fail(key: str, message: str) -> None:
        raise UserError(f"model.{key}: {message}")

    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, f"must be a positive integer, got {value!r}")
    for key, choices in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
        if getattr(spec, key) not in choices:
            fail(key, f"unknown {key} '{getattr(spec, key)}' — choose one of {', '.join(choices)}")
    if spec.d_head is not None and (isinstance(spec.d_head, bool) or not isinstance(spec.d_head, int)
                                    or spec.d_head < 1):
        fail("d_head", f"must be a positive integer or null, got {spec.d_head!r}")
    if spec.d_head is None and spec.d_model % spec.n_heads:
        fail("n_heads", f"d_model {spec.d_model} is not divisible by n_heads {spec.n_heads} — "
                        f"pick n_heads that divides d_model")
    if spec.n_heads % spec.n_kv_heads:
        fail("n_kv_heads", f"n_heads {spec.n_heads} is not divisible by n_kv_heads {spec.n_kv_heads} — "
                           f"pick n_kv_heads that divides n_heads")
    if spec.position == "rope" and spec.head_dim % 2:
        fail("n_heads", f"rope needs an even head dim, got {spec.head_dim}")
    if spec.gelu_approximate not in GELU_APPROXIMATIONS:
        fail("gelu_approximate", f"unknown approximation '{spec.gelu_approximate}' — choose one of "
                                 f"{', '.join(GELU_APPROXIMATIONS)}")
    if spec.rope_scaling is not None:
        _check_rope_scaling(spec, spec.rope_scaling, fail)
    if spec.norm_position not in NORM_POSITIONS:
        fail("norm_position", f"unknown norm_position '{spec.norm_position}' — choose one of {', '.join(NORM_POSITIONS)}")
    for key in ("type_vocab_size", "position_offset"):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(key, f"must be a non-negative integer, got {value!r}")
    if spec.position_offset and spec.position != "learned":
        fail("position_offset", "needs position: learned")
    if not 0.0 <= spec.dropout < 1.0:
        fail("dropout", f"must be in [0, 1), got {spec.dropout!r}")
    for key in ("rope_theta", "norm_eps", "init_std"):
        if not getattr(spec, key) > 0:
            fail(key, f"must be > 0, got {getattr(spec, key)!r}")
    if spec.vocab_size is not None and spec.vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {spec.vocab_size}")  # from the tokenizer, not the user


def _check_rope_scaling(spec: ModelSpec, scaling: tuple[float, float, float, int], fail) -> None:
    """llama3 scaling: factor >= 1, 0 < low_freq_factor < high_freq_factor, a positive original length."""
    if spec.position != "rope":
        fail("rope_scaling", "needs position: rope")
    if len(scaling) != 4:
        fail("rope_scaling", f"expected [factor, low_freq_factor, high_freq_factor, original_max_seq_len], "
                             f"got {list(scaling)}")
    factor, low, high, original = scaling
    if not (factor >= 1 and 0 < low < high and int(original) == original and original >= 1):
        fail("rope_scaling", f"need factor >= 1, 0 < low_freq_factor < high_freq_factor and a positive integer "
                             f"original_max_seq_len, got {list(scaling)}")


def _block_matmul_weights(spec: ModelSpec) -> int:
    """Weights of every Linear inside one block (what the matmul FLOPs are counted on)."""
    d, hd = spec.d_model, spec.head_dim
    qkv = d * (spec.n_heads + 2 * spec.n_kv_heads) * hd
    attn_out = spec.n_heads * hd * d
    mlp_in = d * spec.d_ff * (2 if spec.mlp == "swiglu" else 1)  # swiglu: gate and up
    mlp_out = spec.d_ff * d
    return qkv + attn_out + mlp_in + mlp_out


def _require_vocab(spec: ModelSpec) -> int:
    if spec.vocab_size is None:
        raise ValueError("spec.vocab_size is None; resolve the spec with a vocab_size first")
    return spec.vocab_size


def _head_matmul_weights(spec: ModelSpec) -> int:
    """Weights of the Linears after the final norm: the classifier, or the LM head (the
    encoder's MLM head adds its d x d transform). A tied projection counts: it is a matmul."""
    d = spec.d_model
    if spec.head == "classify":
        assert spec.num_labels is not None  # _resolve_head gives a "classify" spec its num_labels
        return d * spec.num_labels + (d * d if spec.pooler else 0)
    return d * _require_vocab(spec) + (d * d if spec.arch == "encoder" else 0)


def count_params(spec: ModelSpec) -> int:
    """Exact parameter count of the model `spec` describes (tied weights counted once)."""
    vocab, d, hd = _require_vocab(spec), spec.d_model, spec.head_dim
    bias = int(spec.bias)
    norm = d * (2 if spec.norm == "layernorm" and spec.bias else 1)  # RMSNorm never has a bias
    qkv_out = (spec.n_heads + 2 * spec.n_kv_heads) * hd
    mlp_hidden = spec.d_ff * (2 if spec.mlp == "swiglu" else 1)
    block_biases = int(spec.qkv_bias) * qkv_out + bias * (d + mlp_hidden + d)
    qk_norms = 2 * norm // d * hd if spec.qk_norm else 0  # one norm of head_dim each for q and k
    block = 2 * norm + _block_matmul_weights(spec) + block_biases + qk_norms

    total = vocab * d + spec.n_layers * block  # token embedding, blocks
    total += norm * ((spec.norm_position == "pre") + spec.embedding_norm)  # final norm, embedding norm
    total += spec.type_vocab_size * d
    if spec.position == "learned":
        total += (spec.max_seq_len + spec.position_offset) * d
    if spec.head == "classify":
        assert spec.num_labels is not None  # _resolve_head gives a "classify" spec its num_labels
        pooler = (d * d + bias * d) if spec.pooler else 0
        return total + pooler + d * spec.num_labels + bias * spec.num_labels  # classifier; no LM head at all
    if spec.arch == "encoder":
        total += d * d + bias * d + norm + bias * vocab  # MLM transform, its norm, output bias
    if not spec.tie_embeddings:
        total += d * vocab  # output projection (its bias, if any, is counted above)
    return total


def spec_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM / nanoGPT convention:

        6 * N_matmul + 12 * n_layers * d_model * seq_len

    N_matmul counts the weights of every Linear in the blocks plus the head's: the LM head's
    d_model * vocab_size (also when tied: the head matmul is still done), plus the encoder's
    MLM transform d_model * d_model; for head="classify" only the classifier's
    d_model * num_labels, plus the pooler's d_model * d_model (applied once per sequence, but
    counted per token like the rest: a negligible overcount that keeps one formula). Embedding lookups, norms and biases are
    not matmuls and are left out; the second term is the attention score and value matmuls
    (QK^T and AV), not halved for causal masking.
    """
    n_matmul = spec.n_layers * _block_matmul_weights(spec) + _head_matmul_weights(spec)
    return float(6 * n_matmul + 12 * spec.n_layers * spec.d_model * seq_len)
