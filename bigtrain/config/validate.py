"""Cross-field rules of a recipe (the ones a single key's type cannot say), and warnings that are never fatal.

`validate` runs after `build_config` has checked each key's type, with the data-parallel size,
and raises `ConfigError` naming the keys at fault; `recipe_warnings` lists settings that are
valid but probably not what the user meant.
"""

from __future__ import annotations

from pathlib import Path

from bigtrain.config.schema import Config, ConfigError, ParallelConfig, TaskConfig

# Suffixes that mark data.source as a local path that must exist.
_DATA_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet", ".csv")


def validate(cfg: Config, *, world_size: int = 1) -> None:
    """Cross-field rules that need the whole config (and the data-parallel size)."""
    o = cfg.optim
    _check_ranges(cfg)
    _check_batch_and_schedule(cfg, world_size)
    _check_mixture(cfg)
    _check_data_options(cfg)
    _check_ema(cfg)
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


def _check_ranges(cfg: Config) -> None:
    """Counts, sizes and rates that must be positive (or, where 0 means off, at least 0)."""
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


def _check_batch_and_schedule(cfg: Config, world_size: int) -> None:
    """The batch splits evenly over ranks and micro-batches, and the LR schedule fits in train.max_steps."""
    t, o = cfg.train, cfg.optim
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


def _check_data_options(cfg: Config) -> None:
    """data.streaming and data.document_mask apply only to the tasks (and packing) they were made for."""
    if cfg.data.streaming and cfg.task.data_task not in ("causal_lm", "masked_lm"):
        raise ConfigError(f"data.streaming is for pretraining (task.name causal_lm or masked_lm), not {cfg.task.name} "
                          f"— remove it")
    if cfg.data.document_mask and (cfg.task.name != "causal_lm" or not cfg.data.packing):
        raise ConfigError(f"data.document_mask keeps packed documents apart for task.name=causal_lm with data.packing=true "
                          f"(here {cfg.task.name}, packing={str(cfg.data.packing).lower()}) — remove it")


def _check_ema(cfg: Config) -> None:
    """optim.ema_* in range, and eval.use_ema only with an EMA to evaluate."""
    o = cfg.optim
    if o.ema_decay is not None and not 0.0 < o.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay={o.ema_decay} must be in (0, 1), e.g. 0.999")
    if o.ema_start_step < 0:
        raise ConfigError(f"optim.ema_start_step={o.ema_start_step} must be >= 0")
    if cfg.eval.use_ema and o.ema_decay is None:
        raise ConfigError("eval.use_ema needs optim.ema_decay (the EMA's decay, e.g. 0.999) — set it or drop eval.use_ema")


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
