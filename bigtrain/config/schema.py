"""The recipe's schema: one frozen dataclass per section, every field with its default and a one-line help.

A recipe is a YAML mapping of sections (`run`, `model`, `data`, `task`, `train`, `optim`,
`parallel`, `checkpoint`, `eval`, `logging`); `SECTIONS` maps each name to its dataclass, in
recipe order. Every field carries a one-line help text (`describe()` prints them). Derived
numbers (accumulation steps, the run dir) are methods, never extra fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from bigtrain.core.errors import UserError


class ConfigError(UserError):
    """A recipe or override is invalid; the message names the key."""



def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


Precision = Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"]  # parallel.precision

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
    precision: Precision = _opt("auto", "auto (from the hardware: bf16 on GPUs that have it, else fp16; on CPUs bf16 only where bf16 matmul is native, else fp32) | fp32 | bf16 (bf16 compute, fp32 master weights) | fp16 (+ dynamic loss scaling) | bf16-pure (everything bf16)")
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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + ", ".join(type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def describe() -> str:
    """Every key with its type, default and help text (for `bigtrain check --keys`)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name}: {type_name(hints[f.name])} = {f.default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
