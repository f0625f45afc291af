"""Recipe schema, YAML loading, `section.key=value` overrides and validation.

A recipe is a YAML mapping of sections (`run`, `model`, `data`, `task`, `train`, `optim`,
`parallel`, `checkpoint`, `eval`, `logging`). `load_config` reads it with `yaml.safe_load`,
merges command-line overrides, and validates everything in one pass — unknown keys (with a
"did you mean"), types, choices and cross-field rules — before anything is built. The result
is a frozen `Config`. Every field carries a one-line help text (`describe()` prints them).
Derived numbers (accumulation steps, the run dir) are methods, never extra fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from bigtrain.core.errors import UserError


class ConfigError(UserError):
    """A recipe or override is invalid; the message names the key."""


class _NotFinite(ConfigError):
    """A float key got nan or ±inf (said as such, not as a type mismatch)."""


class _UnknownKey(ConfigError):
    """A mapping-valued key with a key it does not have (raised through Optional[...], unlike a type mismatch)."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    name: Optional[str] = _opt(None, "run name; the run dir is output_dir/name (default: the recipe file's stem)")
    output_dir: str = _opt("runs", "folder that holds run dirs")
    seed: int = _opt(0, "seed for model init, data order and dropout")


@dataclass(frozen=True)
class LoraConfig:
    """model.lora: low-rank adapters on the blocks' Linears, everything else frozen."""

    rank: int = _opt(16, "rank of each adapter")
    alpha: float = _opt(32.0, "scale: the update is alpha / rank · B A")
    dropout: float = _opt(0.0, "dropout on the adapters' input")
    targets: tuple[Literal["qkv", "out", "mlp"], ...] = _opt(("qkv", "out", "mlp"), "Linears that get adapters: qkv (attention's fused query/key/value), out (attention's output), mlp (the MLP's in and out)")

    @property
    def scaling(self) -> float:
        """The factor of the adapters' update B A."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _opt("decoder", "model family: decoder (GPT-2 / Llama style) | encoder (BERT style)")
    preset: str = _opt("debug", "named size: debug, gpt2-124m, gpt2-355m, llama-1b, llama-8b (decoder); debug, bert-tiny, bert-base, bert-large (encoder)")
    init_from: Optional[str] = _opt(None, "start from the weights of a run dir, a checkpoint, a Hugging Face model folder (config.json + safetensors; its config.json sets the model keys) or a hub id (org/name, downloaded through the Hugging Face cache); its tokenizer comes along")
    init_revision: Optional[str] = _opt(None, "with a hub id as init_from: the branch, tag or commit to take (default: main)")
    n_layers: Optional[int] = _opt(None, "transformer blocks (default: the preset's)")
    d_model: Optional[int] = _opt(None, "hidden width (default: the preset's)")
    n_heads: Optional[int] = _opt(None, "attention heads (default: the preset's)")
    n_kv_heads: Optional[int] = _opt(None, "key/value heads for grouped-query attention (default: the preset's)")
    d_ff: Optional[int] = _opt(None, "MLP hidden width (default: the preset's)")
    max_seq_len: Optional[int] = _opt(None, "longest sequence the model accepts (default: the preset's)")
    norm: Optional[str] = _opt(None, "layernorm | rmsnorm (default: the preset's)")
    position: Optional[str] = _opt(None, "learned | rope (default: the preset's)")
    mlp: Optional[str] = _opt(None, "gelu | swiglu (default: the preset's)")
    tie_embeddings: Optional[bool] = _opt(None, "share input embedding and output head (default: the preset's)")
    bias: Optional[bool] = _opt(None, "biases in linear layers and norms (default: the preset's)")
    dropout: Optional[float] = _opt(None, "dropout probability (default: the preset's)")
    rope_theta: Optional[float] = _opt(None, "RoPE base frequency (default: the preset's)")
    norm_eps: Optional[float] = _opt(None, "epsilon of the norms (default: the preset's)")
    init_std: Optional[float] = _opt(None, "std of the normal weight init (default: the preset's)")
    d_head: Optional[int] = _opt(None, "width of one attention head (default: d_model / n_heads)")
    qkv_bias: Optional[bool] = _opt(None, "biases on the query/key/value projection (default: model.bias; Qwen2: true with bias false)")
    qk_norm: Optional[bool] = _opt(None, "normalise each head's query and key before RoPE, as Qwen3 (default: false)")
    rope_scaling: Optional[tuple[float, float, float, int]] = _opt(None, "Llama 3.1 RoPE scaling [factor, low_freq_factor, high_freq_factor, original_max_seq_len] (default: none)")
    gelu_approximate: Optional[Literal["tanh", "none"]] = _opt(None, "GELU MLP: tanh approximation (GPT-2's gelu_new) | none (exact erf) (default: tanh)")
    norm_position: Optional[Literal["pre", "post"]] = _opt(None, "pre: x + f(norm(x)) and a final norm | post: norm(x + f(x)), as BERT (default: pre)")
    embedding_norm: Optional[bool] = _opt(None, "a norm on the summed embeddings, as BERT (default: false)")
    type_vocab_size: Optional[int] = _opt(None, "rows of BERT's token-type (segment) embedding; one segment, so row 0 is added (default: 0, none)")
    position_offset: Optional[int] = _opt(None, "learned positions start at this row, as RoBERTa's padding_idx + 1 (default: 0)")
    pooler: Optional[bool] = _opt(None, "classification: Linear + tanh on the pooled token before the classifier, as BERT (default: false)")
    vocab_size: Optional[int] = _opt(None, "rows of the token embedding (default: the tokenizer's size rounded up to a multiple of 64; a Hugging Face init_from sets it)")
    lora: Optional[LoraConfig] = _opt(None, "LoRA fine-tuning: a mapping {rank, alpha, dropout, targets}, e.g. {rank: 16, alpha: 32, targets: [qkv, out, mlp]}; the base weights are frozen, only the adapters (and a classifier head) train")

    def describe(self) -> str:
        """The model as logs name it: arch/preset, or arch from where init_from takes it."""
        return f"{self.arch} from {self.init_from}" if self.init_from else f"{self.arch}/{self.preset}"


@dataclass(frozen=True)
class MixtureSource:
    """One source of data.mixture: its weight and the data keys it sets (unset: the data section's)."""

    source: str = _opt("", "the source, as data.source")
    weight: float = _opt(0.0, "its share of the training samples (weights are normalised to sum to 1)")
    name: Optional[str] = _opt(None, "its name in logs and metrics (default: source1, source2, …)")
    subset: Optional[str] = _opt(None, "as data.subset")
    split: Optional[str] = _opt(None, "as data.split")
    revision: Optional[str] = _opt(None, "as data.revision")
    text_column: Optional[str] = _opt(None, "as data.text_column (default: the data section's)")
    max_documents: Optional[int] = _opt(None, "as data.max_documents (default: the data section's)")
    validation_split: Optional[float] = _opt(None, "as data.validation_split (default: the data section's)")
    tokenizer: Optional[str] = _opt(None, "as data.tokenizer: every source must use the same one")


@dataclass(frozen=True)
class DataConfig:
    source: str = _opt("python-stdlib", "python-stdlib, a local text/json/jsonl/parquet/csv file or folder, a save_to_disk folder, or a hub dataset name")
    subset: Optional[str] = _opt(None, "hub dataset config name")
    split: Optional[str] = _opt(None, "the split to train on (default: train; a source with several splits and none named train needs it)")
    revision: Optional[str] = _opt(None, "hub dataset: the branch, tag or commit to load (default: main)")
    text_column: str = _opt("text", "column holding the text")
    pair_column: Optional[str] = _opt(None, "classification: optional second text column (sentence pairs)")
    label_column: str = _opt("label", "classification: column holding the label (strings or ints)")
    prompt_column: str = _opt("prompt", "sft: column holding the prompt")
    response_column: str = _opt("response", "sft: column holding the response")
    messages_column: Optional[str] = _opt(None, "sft: column holding a chat-style list of {role, content} messages (instead of prompt/response)")
    validation_split: float = _opt(0.01, "fraction of documents held out for validation when the source has no validation split")
    max_documents: Optional[int] = _opt(None, "use only the first N documents (quick runs and tests)")
    tokenizer: Optional[str] = _opt(None, "a tokenizer.json, or a Hugging Face tokenizer folder holding one; default: train a byte-level BPE of vocab_size on the corpus")
    vocab_size: int = _opt(8192, "vocabulary size of the BPE trained when no tokenizer is given")
    tokenizer_sample_bytes: Optional[int] = _opt(None, "the trained BPE reads at most this much text: a uniform random sample of the training documents when the corpus is larger (default 2^30)")
    seq_len: int = _opt(256, "tokens per training sequence")
    cache_dir: str = _opt("~/.cache/bigtrain", "where tokenizers and packed token shards are cached")
    packing: bool = _opt(True, "pack documents (sft: prompt/response pairs, attention kept inside each) into full sequences; false: one padded example per sample")
    streaming: bool = _opt(False, "read a local data file/folder or hub dataset as a stream (causal_lm, masked_lm): never loaded whole or converted to Arrow; a trained BPE reads the stream's beginning")
    document_mask: bool = _opt(False, "causal_lm with packing: a token attends only to its own document (block-diagonal causal mask), positions restart at each document, and an EOS predicts nothing: each document trains as if alone")
    mixture: tuple[MixtureSource, ...] = _opt((), "train on several sources at once, each a mapping with source, weight and any source key of this section (name, subset, split, revision, text_column, max_documents, validation_split): e.g. [{source: a.jsonl, weight: 0.7}, {source: b.jsonl, weight: 0.3}]; causal_lm and masked_lm; every 1,000 consecutive samples hold each source's share; each source is prepared into its own cache")
    mixture_exhaust: Literal["repeat", "stop"] = _opt("repeat", "data.mixture: a source that runs out of samples starts over in a new order (repeat), or the mixture's epoch ends with the first source to run out (stop)")


@dataclass(frozen=True)
class TaskConfig:
    name: Literal["causal_lm", "masked_lm", "classification", "sft", "distill", "distill_classification"] = _opt("causal_lm", "training objective: causal_lm | masked_lm | classification | sft | distill (a decoder learns from task.teacher on causal-LM data) | distill_classification (a classifier learns from a classifier teacher)")
    mask_prob: float = _opt(0.15, "masked_lm: fraction of non-special tokens selected (then 80% [MASK], 10% random, 10% kept)")
    loss_chunk_tokens: int = _opt(0, "causal_lm, sft: compute the LM head and loss this many positions at a time, recomputing each chunk's logits in backward, so the (batch, seq_len, vocab) fp32 logits never exist whole (large vocabularies); 0: all at once")
    pooling: Literal["auto", "first", "last"] = _opt("auto", "classification: pool the first token (auto for encoders) or the last non-pad token (auto for decoders)")
    teacher: Optional[str] = _opt(None, "distill, distill_classification: the frozen teacher — a run dir, a checkpoint or a Hugging Face model folder with the student's tokenizer (and labels)")
    alpha: float = _opt(0.5, "distill: weight of the teacher term, alpha · τ² · KL(teacher ‖ student at temperature τ), against (1 − alpha) · the cross-entropy with the data's targets")
    temperature: float = _opt(1.0, "distill: τ, the softmax temperature of teacher and student in the KL term (above 1 flattens both: more weight on the teacher's unlikely tokens)")

    @property
    def data_task(self) -> str:
        """The task whose prepared data this one reads (distillation reads its student task's)."""
        return {"distill": "causal_lm", "distill_classification": "classification"}.get(self.name, self.name)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = _opt(1000, "optimizer steps of the whole run; the LR schedule ends here")
    global_batch_size: int = _opt(32, "sequences per optimizer step, summed over ranks and accumulation")
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one rank")
    stop_at_step: Optional[int] = _opt(None, "end this invocation after this step with a checkpoint; the schedule stays max_steps'")
    max_skipped_steps: int = _opt(5, "stop with an error after this many non-finite steps in a row")

    def accum_steps(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each rank (derived, never set)."""
        return self.global_batch_size // (self.micro_batch_size * dp_size)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _opt(3e-4, "peak learning rate")
    final_lr_ratio: float = _opt(0.1, "LR at max_steps as a fraction of lr (cosine/linear/wsd)")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = _opt("cosine", "decay after warmup: cosine | linear | constant | wsd (warmup, stable at lr, then decay over the last optim.decay_steps)")
    warmup_steps: int = _opt(0, "steps of linear warmup from 0 to lr")
    decay_steps: Optional[int] = _opt(None, "wsd: steps of the final decay, ending at max_steps (raise train.max_steps on resume to extend the stable phase)")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = _opt("1-sqrt", "wsd: the decay's shape: linear | cosine | 1-sqrt (lr × (1 - sqrt(progress)), toward final_lr_ratio)")
    weight_decay: float = _opt(0.1, "AdamW weight decay on every matrix, embeddings included (not on norm weights and biases)")
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping; the norm is still reported)")
    ema_decay: Optional[float] = _opt(None, "keep an fp32 exponential moving average of the weights with this decay (e.g. 0.999), sharded like the parameters (fsdp, ZeRO-3) and saved in checkpoints; eval.use_ema evaluates it, export --ema exports it")
    ema_start_step: int = _opt(0, "optim.ema_decay: until this step the average is a copy of the weights; from it on, ema = decay × ema + (1 − decay) × weights after each step")


@dataclass(frozen=True)
class ParallelConfig:
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = _opt("auto", "auto (ddp when started with several processes, else single) | single | ddp | fsdp (FSDP2) | deepspeed (ZeRO)")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"] = _opt("auto", "auto (from the hardware: bf16 on GPUs that have it, else fp16; on CPUs bf16 only where bf16 matmul is native, else fp32) | fp32 | bf16 (bf16 compute, fp32 master weights) | fp16 (+ dynamic loss scaling) | bf16-pure (everything bf16)")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto (cuda when available) | cpu | cuda")
    activation_checkpointing: Literal["none", "full", "selective"] = _opt("none", "recompute activations in backward to save memory: none | full (each block's, all of them; true means full) | selective (each block keeps its matmul and attention outputs and recomputes the cheap ops between them)")
    compile: bool = _opt(False, "torch.compile each block")
    tf32: bool = _opt(True, "on CUDA, fp32 matmuls and convolutions use TF32 tensor cores; false for exact fp32")
    zero_stage: Literal[1, 2, 3] = _opt(2, "deepspeed: ZeRO stage 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters) sharded over ranks")
    offload_optimizer: Literal["none", "cpu", "nvme"] = _opt("none", "deepspeed: keep optimizer state (and its step) on cpu or nvme (offload_path)")
    offload_params: Literal["none", "cpu", "nvme"] = _opt("none", "fsdp: cpu keeps sharded parameters, gradients and the optimizer step on the CPU; deepspeed (zero_stage 3): cpu or nvme")
    offload_path: Optional[str] = _opt(None, "deepspeed: folder for nvme offload")
    deepspeed_config: Optional[str] = _opt(None, "deepspeed: a JSON file of extra DeepSpeed config keys; a key that contradicts the recipe is an error")
    shard_group_size: Optional[int] = _opt(None, "fsdp: shard within groups of this many ranks and replicate across groups (HSDP); default: shard over all ranks")
    fsdp_no_sync: bool = _opt(False, "fsdp: reduce-scatter gradients only at a step's last micro-batch (fewer collectives, for HSDP or slow networks) — meanwhile every rank holds the unsharded fp32 gradient of every parameter; default: reduce-scatter each micro-batch into the sharded gradient")
    init_timeout_s: float = _opt(600.0, "seconds every rank waits for the others to join (rendezvous, preflight) before failing with a diagnosis")
    collective_timeout_s: float = _opt(1800.0, "seconds a collective (all-reduce, gather, barrier) may wait for the slowest rank before the job fails; rank 0's data preparation holds none open, however long")
    hang_timeout_s: float = _opt(300.0, "with several processes, a training step still running after this many seconds (and hang_step_factor × the median step time) is a hang: every rank dumps its Python stacks and last phases to stderr and RUN/hang/rank-N.txt and the job exits 3 naming the ranks that did not arrive; the first steps, eval and checkpoints get collective_timeout_s instead; 0: off")
    hang_step_factor: float = _opt(10.0, "a step is a hang only once it has also run this many times the median of the last 50 step times, so slow steps of a big model are not cut off at hang_timeout_s")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _opt(0, "save every N steps (0: only at the end); always at the end and at stop_at_step")
    keep_last: int = _opt(3, "keep this many newest checkpoints (0: keep all)")
    resume: str = _opt("auto", "auto (newest complete checkpoint in the run dir) | none | a checkpoint path")
    lease_timeout_s: float = _opt(300.0, "a run dir has one training job at a time: rank 0 renews RUN/owner.json every "
                                         "lease_timeout_s / 5 and checks it before each save; a start finds another "
                                         "job's lease live (exit 2, naming it) or not renewed for this long (taken over)")
    async_save: bool = _opt(True, "copy the state to host memory and write it in the background (single, ddp, fsdp; "
                                  "needs host memory for one more copy of this rank's state); the next save and "
                                  "exit wait for it; preemption saves synchronously")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    max_samples: Optional[int] = _opt(None, "evaluate on the first N validation samples (a mixture: taken from its sources in turn, so each counts alike; default: all)")
    micro_batch_size: Optional[int] = _opt(None, "eval sequences per forward (default: train.micro_batch_size)")
    tasks: tuple[str, ...] = _opt((), "lm-eval tasks scored at each eval, each rank a share of the documents (decoder runs; pip install 'bigtrain[eval]'), e.g. [hellaswag, arc_easy]")
    tasks_limit: Optional[int] = _opt(None, "eval.tasks: only the first N documents of each task (default: all)")
    tasks_num_fewshot: Optional[int] = _opt(None, "eval.tasks: few-shot examples per prompt (default: each task's own)")
    tasks_include_path: Optional[str] = _opt(None, "eval.tasks: a folder of extra lm-eval task YAML files — code you trust: lm-eval runs the Python their !function entries name")
    use_ema: bool = _opt(False, "evaluate the EMA weights (optim.ema_decay) instead of the trained ones, in training and in `bigtrain eval`")


@dataclass(frozen=True)
class LoggingConfig:
    every: int = _opt(10, "log training metrics every N steps (1: every step)")
    wandb: Literal["online", "offline", "disabled"] = _opt("disabled", "online | offline | disabled")
    wandb_project: str = _opt("bigtrain", "wandb project")
    wandb_entity: Optional[str] = _opt(None, "wandb entity (team or user)")
    progress: bool = _opt(True, "live progress display on rank 0")
    curves: bool = _opt(True, "rank 0 redraws RUN/curves.png (matplotlib) at each eval and at the end")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / (self.run.name or "run")

    def to_dict(self) -> dict:
        """Plain nested dict (lists, not tuples) for config.yaml and wandb."""
        return _plain(dataclasses.asdict(self))


# Section name -> its dataclass, in recipe order.
SECTIONS: dict[str, type] = typing.get_type_hints(Config)

# Suffixes that mark data.source as a local path that must exist.
_DATA_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet", ".csv")


# --------------------------------------------------------------------------- loading


def load_config(recipe: str | os.PathLike, overrides: list[str] = (), *, world_size: int | None = None) -> Config:
    """Read a recipe, apply `section.key=value` overrides, validate, and return a frozen Config.

    world_size defaults to $WORLD_SIZE (set by torchrun/accelerate/deepspeed) or 1.
    """
    path = Path(recipe)
    raw = load_raw(path, overrides)
    if isinstance(raw.get("run") or {}, dict) and (raw.get("run") or {}).get("name") is None:
        raw["run"] = {**(raw.get("run") or {}), "name": path.stem}
    cfg = build_config(raw, where=str(path))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world_size)
    return cfg


def load_raw(recipe: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """The recipe's YAML mapping with the overrides merged in, before defaults and checks: the keys a user set."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return raw


def _apply_override(raw: dict, item: str) -> None:
    """section.key=value, or section.key.field=value for a key that holds a mapping (model.lora.rank=8: the
    mapping made if the recipe has none; its fields are checked with the rest)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"override '{item}': expected section.key=value, e.g. optim.lr=1e-3")
    section, name = parts[:2]
    if section not in SECTIONS:
        raise ConfigError(f"override '{item}': unknown section '{section}'{_did_you_mean(section, SECTIONS)}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"section '{section}' must be a mapping")
    if len(parts) == 3:
        if target.get(name) is None:
            target[name] = {}
        if not isinstance(target[name], dict):
            raise ConfigError(f"override '{item}': {section}.{name} is not a mapping — set it whole: "
                              f"{section}.{name}=VALUE")
        target, name = target[name], parts[2]
    target[name] = value


def build_config(raw: dict, *, where: str = "recipe") -> Config:
    """Turn a nested dict into a Config, checking keys and types (no cross-field rules)."""
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section '{section}'{_did_you_mean(section, SECTIONS)}")
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            path = f"{section}.{key}"
            if key not in hints:
                raise ConfigError(f"{where}: unknown key '{path}'{_did_you_mean(path, _all_keys())}")
            value = _BOOL_ALIASES.get(path, {}).get(value, value) if isinstance(value, bool) else value
            kwargs[key] = _check_type(value, hints[key], path, where)
        sections[section] = cls(**kwargs)
    return Config(**sections)


# Keys that were booleans once: true / false still mean these choices.
_BOOL_ALIASES = {"parallel.activation_checkpointing": {True: "full", False: "none"}}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, options) -> str:
    options = list(options)
    # Also match on the bare key so 'train.lr' suggests 'optim.lr'.
    bare = {o.split(".")[-1]: o for o in options}
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = [bare[m] for m in difflib.get_close_matches(word.split(".")[-1], list(bare), n=1, cutoff=0.75)]
    return f" — did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any, path: str, where: str) -> Any:
    """Return value converted to tp (int→float, numeric strings→float, list→tuple), or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, path, where)
            except (_NotFinite, _UnknownKey):  # the mapping was meant: name its bad key, not the type
                raise
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(str(a) for a in typing.get_args(tp))
        raise ConfigError(f"{where}: {path}={value!r} is not one of: {choices}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[X, ...]: any length
            return tuple(_check_type(v, args[0], path, where) for v in value)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_check_type(v, a, path, where) for v, a in zip(value, args))
    elif dataclasses.is_dataclass(tp):  # a mapping of the dataclass's keys (data.mixture's entries)
        if isinstance(value, dict):
            hints = typing.get_type_hints(tp)
            for key in value:
                if key not in hints:
                    raise _UnknownKey(f"{where}: unknown key '{key}' in {path} — one of: {', '.join(hints)}")
            return tp(**{key: _check_type(v, hints[key], f"{path}.{key}", where) for key, v in value.items()})
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise _NotFinite(f"{where}: {path}={value!r} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {path} must be {_type_name(tp)}, got {value!r}")


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, *, world_size: int = 1) -> None:
    """Cross-field rules that need the whole config (and the data-parallel size)."""
    t, o = cfg.train, cfg.optim

    def positive(path: str, value: int | float | None, *, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{path}={value} must be {'>= 0' if allow_zero else '> 0'}")

    positive("train.max_steps", t.max_steps)
    positive("train.global_batch_size", t.global_batch_size)
    positive("train.micro_batch_size", t.micro_batch_size)
    positive("train.max_skipped_steps", t.max_skipped_steps)
    positive("data.seq_len", cfg.data.seq_len)
    positive("data.vocab_size", cfg.data.vocab_size)
    positive("data.max_documents", cfg.data.max_documents)
    positive("data.tokenizer_sample_bytes", cfg.data.tokenizer_sample_bytes)
    positive("optim.lr", o.lr, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    positive("optim.eps", o.eps)
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last, allow_zero=True)
    positive("checkpoint.lease_timeout_s", cfg.checkpoint.lease_timeout_s)
    positive("eval.every", cfg.eval.every, allow_zero=True)
    positive("eval.max_samples", cfg.eval.max_samples)
    positive("eval.micro_batch_size", cfg.eval.micro_batch_size)
    positive("logging.every", cfg.logging.every)

    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size × "
            f"data-parallel size = {t.micro_batch_size} × {world_size} = {per_step}"
        )
    if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step} must be in 1..train.max_steps ({t.max_steps})")
    if not 0.0 <= o.final_lr_ratio <= 1.0:
        raise ConfigError(f"optim.final_lr_ratio={o.final_lr_ratio} must be in [0, 1]")
    if o.schedule == "wsd":
        if o.decay_steps is None or o.decay_steps <= 0:
            raise ConfigError(f"optim.schedule=wsd needs optim.decay_steps > 0 (got {o.decay_steps}): the steps of "
                              f"the final decay")
        if o.warmup_steps + o.decay_steps > t.max_steps:
            raise ConfigError(f"optim.warmup_steps + optim.decay_steps = {o.warmup_steps} + {o.decay_steps} exceeds "
                              f"train.max_steps={t.max_steps}: no room for the stable phase")
    elif o.decay_steps is not None:
        raise ConfigError(f"optim.decay_steps is a wsd setting but optim.schedule={o.schedule} — set "
                          f"optim.schedule=wsd or remove it")
    _check_mixture(cfg)
    if cfg.data.streaming and cfg.task.data_task not in ("causal_lm", "masked_lm"):
        raise ConfigError(f"data.streaming is for pretraining (task.name causal_lm or masked_lm), not {cfg.task.name} "
                          f"— remove it")
    if cfg.data.document_mask and (cfg.task.name != "causal_lm" or not cfg.data.packing):
        raise ConfigError(f"data.document_mask keeps packed documents apart for task.name=causal_lm with data.packing=true "
                          f"(here {cfg.task.name}, packing={str(cfg.data.packing).lower()}) — remove it")
    if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay={o.ema_decay} must be in (0, 1), e.g. 0.999")
    if o.ema_start_step < 0:
        raise ConfigError(f"optim.ema_start_step={o.ema_start_step} must be >= 0")
    if cfg.eval.use_ema and o.ema_decay is None:
        raise ConfigError("eval.use_ema needs optim.ema_decay (the EMA's decay, e.g. 0.999) — set it or drop eval.use_ema")
    if cfg.task.loss_chunk_tokens < 0:
        raise ConfigError(f"task.loss_chunk_tokens={cfg.task.loss_chunk_tokens} must be >= 0 (0: no chunks)")
    if cfg.task.loss_chunk_tokens and cfg.task.name not in ("causal_lm", "sft"):
        raise ConfigError(f"task.loss_chunk_tokens chunks a next-token loss (causal_lm, sft), not {cfg.task.name} — "
                          f"remove it")
    if not 0.0 < cfg.task.mask_prob <= 1.0:
        raise ConfigError(f"task.mask_prob={cfg.task.mask_prob} must be in (0, 1]")
    if not 0.0 <= cfg.data.validation_split < 1.0:
        raise ConfigError(f"data.validation_split={cfg.data.validation_split} must be in [0, 1)")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must each be in [0, 1)")
    _check_lora(cfg)
    _check_distill(cfg.task)
    _check_eval_tasks(cfg)
    _check_parallel(cfg.parallel, world_size)
    _check_paths(cfg)


def _check_lora(cfg: Config) -> None:
    lora = cfg.model.lora
    if lora is None:
        return
    if lora.rank < 1:
        raise ConfigError(f"model.lora.rank={lora.rank} must be >= 1")
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha={lora.alpha} must be > 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.targets:
        raise ConfigError("model.lora.targets is empty — name at least one of qkv, out, mlp")


def _check_distill(task: TaskConfig) -> None:
    distill = task.name.startswith("distill")
    if distill and not task.teacher:
        raise ConfigError(f"task.name={task.name} needs task.teacher: the run dir, checkpoint or Hugging Face folder to "
                          f"learn from")
    if task.teacher and not distill:
        raise ConfigError(f"task.teacher is for task.name distill or distill_classification, not {task.name} — remove "
                          f"it (model.init_from starts from a model's weights)")
    if not 0.0 <= task.alpha <= 1.0:
        raise ConfigError(f"task.alpha={task.alpha} must be in [0, 1]")
    if not task.temperature > 0:
        raise ConfigError(f"task.temperature={task.temperature} must be > 0")


def recipe_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what the user meant (printed at start; never fatal)."""
    found = []
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        peak = cfg.optim.lr * cfg.train.max_steps / cfg.optim.warmup_steps
        found.append(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} exceeds train.max_steps="
                     f"{cfg.train.max_steps}: the LR rises along the warmup and stops at {peak:.3g}, "
                     f"never reaching optim.lr={cfg.optim.lr:g}")
    return found


def _check_parallel(p: ParallelConfig, world_size: int) -> None:
    if p.strategy == "single" and world_size > 1:
        raise ConfigError(f"parallel.strategy=single but {world_size} processes were started — use ddp, fsdp, deepspeed or one process")
    deepspeed_only = {"zero_stage": p.zero_stage != 2, "offload_optimizer": p.offload_optimizer != "none",
                      "offload_path": p.offload_path is not None, "deepspeed_config": p.deepspeed_config is not None}
    if p.strategy != "deepspeed":
        for key, is_set in deepspeed_only.items():
            if is_set:
                raise ConfigError(f"parallel.{key} is a deepspeed setting but parallel.strategy={p.strategy} — set parallel.strategy=deepspeed or remove it")
    if p.strategy != "fsdp" and p.fsdp_no_sync:
        raise ConfigError(f"parallel.fsdp_no_sync is an fsdp setting but parallel.strategy={p.strategy} — set parallel.strategy=fsdp or remove it")
    if p.strategy != "fsdp" and p.shard_group_size is not None:
        raise ConfigError(f"parallel.shard_group_size is an fsdp setting but parallel.strategy={p.strategy} — set parallel.strategy=fsdp or remove it")
    if p.offload_params != "none" and p.strategy not in ("fsdp", "deepspeed"):
        raise ConfigError(f"parallel.offload_params={p.offload_params} needs parallel.strategy fsdp or deepspeed, got {p.strategy}")
    if p.strategy == "fsdp" and p.offload_params == "nvme":
        raise ConfigError("parallel.offload_params=nvme needs parallel.strategy=deepspeed (fsdp offloads to cpu only)")
    if p.strategy == "deepspeed" and p.offload_params != "none" and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params={p.offload_params} needs parallel.zero_stage=3, got {p.zero_stage}")
    if "nvme" in (p.offload_params, p.offload_optimizer) and not p.offload_path:
        raise ConfigError("nvme offload needs parallel.offload_path (a folder on a fast local disk)")
    if p.shard_group_size is not None and (p.shard_group_size <= 0 or world_size % p.shard_group_size):
        raise ConfigError(f"parallel.shard_group_size={p.shard_group_size} must divide the world size {world_size}")
    if p.deepspeed_config is not None and not Path(p.deepspeed_config).expanduser().is_file():
        raise ConfigError(f"parallel.deepspeed_config: no such file '{p.deepspeed_config}'")
    if p.init_timeout_s <= 0:
        raise ConfigError(f"parallel.init_timeout_s={p.init_timeout_s} must be > 0")
    if p.collective_timeout_s <= 0:
        raise ConfigError(f"parallel.collective_timeout_s={p.collective_timeout_s} must be > 0")
    if p.hang_timeout_s < 0:
        raise ConfigError(f"parallel.hang_timeout_s={p.hang_timeout_s} must be >= 0 (0: no hang watchdog)")
    if p.hang_step_factor < 1:
        raise ConfigError(f"parallel.hang_step_factor={p.hang_step_factor} must be >= 1 (a step's limit is at least the median step time)")


def _check_mixture(cfg: Config) -> None:
    d = cfg.data
    if not d.mixture:
        return
    if cfg.task.data_task not in ("causal_lm", "masked_lm"):
        raise ConfigError(f"data.mixture is for pretraining (task.name causal_lm or masked_lm), not {cfg.task.name} — "
                          f"give that task one data.source")
    names = []
    for i, entry in enumerate(d.mixture):
        where = f"data.mixture[{i}]"
        if not entry.source:
            raise ConfigError(f"{where} has no source — each entry needs source and weight")
        if not entry.weight > 0:
            raise ConfigError(f"{where}.weight={entry.weight:g} must be > 0 (its share of the samples)")
        if entry.validation_split is not None and not 0.0 <= entry.validation_split < 1.0:
            raise ConfigError(f"{where}.validation_split={entry.validation_split} must be in [0, 1)")
        names.append(entry.name or f"source{i + 1}")
    if len(set(names)) < len(names):
        raise ConfigError(f"data.mixture: two sources are named alike ({', '.join(names)}) — give each a distinct name")
    tokenizers = {entry.tokenizer or d.tokenizer for entry in d.mixture}
    if len(tokenizers) > 1:
        shown = ", ".join(sorted(str(t) for t in tokenizers))
        raise ConfigError(f"data.mixture: the sources use different tokenizers ({shown}) — a mixture trains one "
                          f"model on one vocabulary: set data.tokenizer once")


def _check_eval_tasks(cfg: Config) -> None:
    e = cfg.eval
    if not e.tasks:
        for key in ("tasks_limit", "tasks_num_fewshot", "tasks_include_path"):
            if getattr(e, key) is not None:
                raise ConfigError(f"eval.{key} applies to eval.tasks, which is empty — name lm-eval tasks in eval.tasks or remove it")
        return
    if cfg.model.arch != "decoder" or cfg.task.data_task not in ("causal_lm", "sft"):
        raise ConfigError(f"eval.tasks scores a decoder language model (task causal_lm or sft), not "
                          f"model.arch={cfg.model.arch} with task.name={cfg.task.name}")
    if e.tasks_limit is not None and e.tasks_limit < 1:
        raise ConfigError(f"eval.tasks_limit={e.tasks_limit} must be at least 1")
    if e.tasks_num_fewshot is not None and e.tasks_num_fewshot < 0:
        raise ConfigError(f"eval.tasks_num_fewshot={e.tasks_num_fewshot} must be >= 0")
    if e.tasks_include_path is not None and not Path(e.tasks_include_path).expanduser().is_dir():
        raise ConfigError(f"eval.tasks_include_path: no such folder '{e.tasks_include_path}'")


def _check_paths(cfg: Config) -> None:
    source = cfg.data.source
    looks_local = source.startswith(("/", "./", "../", "~")) or source.lower().endswith(_DATA_SUFFIXES)
    if looks_local and not Path(source).expanduser().exists():
        raise ConfigError(f"data.source: no such file or folder '{source}'")
    tokenizer = Path(cfg.data.tokenizer).expanduser() if cfg.data.tokenizer is not None else None
    if tokenizer is not None and not (tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer).is_file():
        what = "no tokenizer.json in folder" if tokenizer.is_dir() else "no such file"
        raise ConfigError(f"data.tokenizer: {what} '{cfg.data.tokenizer}'")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).expanduser().exists():
        raise ConfigError(f"checkpoint.resume: no such checkpoint '{resume}' (use auto, none or a path)")


# --------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """Every key with its type, default and help text (for `bigtrain check --keys`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {f.default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
