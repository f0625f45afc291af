"""The DeepSpeed config of a recipe: generated from it (batch sizes, accumulation, precision, clipping, ZeRO
settings), merged with `parallel.deepspeed_config`, which may add keys but never contradict those; its "auto"
values (the Hugging Face Trainer's and accelerate's convention) take the recipe's, so a user's ds_config.json
works as it is. Imports no deepspeed (the launcher's precision choice reads config_precision)."""

from __future__ import annotations

import json
from pathlib import Path

from bigtrain.core.errors import UserError


def recipe_deepspeed_config(recipe, world_size: int) -> dict[str, tuple[object, str]]:
    """DeepSpeed config keys the recipe decides: dotted key -> (value, the recipe key it comes from)."""
    p, t = recipe.parallel, recipe.train
    keys = {
        "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.accum_steps(world_size), "train.accum_steps (derived)"),
        "gradient_clipping": (float(recipe.optim.grad_clip), "optim.grad_clip"),
        "bf16.enabled": (p.precision == "bf16", "parallel.precision"),
        "fp16.enabled": (p.precision == "fp16", "parallel.precision"),
        "zero_optimization.stage": (p.zero_stage, "parallel.zero_stage"),
    }
    if p.precision == "bf16":  # micro-batch gradients summed in fp32 (DeepSpeed's default: the model's bf16)
        keys["data_types.grad_accum_dtype"] = ("fp32", "parallel.precision")
        keys["bf16.check_grad_overflow"] = (True, "parallel.precision")  # skip non-finite steps (the loop's contract)
    if p.zero_stage == 3 and p.activation_checkpointing == "selective":
        # ZeRO-3's memory-efficient linear (DeepSpeed swaps it in for F.linear) adds the bias in place to the
        # matmul's output, which selective checkpointing keeps for the recomputation: the recomputed block
        # then adds the bias twice and every gradient after the first step is wrong. torch's linear instead.
        keys["zero_optimization.memory_efficient_linear"] = (False, "parallel.activation_checkpointing")
    for what, setting, source in (("optimizer", p.offload_optimizer, "parallel.offload_optimizer"),
                                  ("param", p.offload_params, "parallel.offload_params")):
        keys[f"zero_optimization.offload_{what}.device"] = (setting, source)
        if setting == "nvme":
            keys[f"zero_optimization.offload_{what}.nvme_path"] = (p.offload_path, "parallel.offload_path")
    return keys


# Operational defaults of ours that a deepspeed_config file may change freely.
_DEFAULTS = {
    "steps_per_print": 2**31 - 1,      # bigtrain logs progress itself
    "wall_clock_breakdown": False,
    "zero_allow_untested_optimizer": True,  # torch AdamW is our optimizer
    "fp16.loss_scale": 0,              # dynamic loss scaling
    "fp16.initial_scale_power": 16,
    # Gradient reduction overlaps the backward; gradients go into one contiguous buffer (no fragmentation).
    "zero_optimization.overlap_comm": True,
    "zero_optimization.contiguous_gradients": True,
}

# Sizes in elements, each at most a quarter of the model's parameters (_sized_to_model): a gradient bucket
# as large as the model overlaps nothing and fills to the whole gradient; at ZeRO-3 a reuse distance or live
# limit beyond the model keeps every gathered parameter resident from forward to backward. For a model of a
# billion parameters or more these are the ceilings: buckets of 2e8 (0.8 GB fp32, enough to saturate NCCL
# and still overlap), DeepSpeed's own 5e7 prefetch and 1e9 live / reuse limits.
_MODEL_SIZED = {
    "zero_optimization.reduce_bucket_size": 200_000_000,
    "zero_optimization.allgather_bucket_size": 200_000_000,
    "zero_optimization.stage3_prefetch_bucket_size": 50_000_000,
    "zero_optimization.stage3_max_live_parameters": 1_000_000_000,
    "zero_optimization.stage3_max_reuse_distance": 1_000_000_000,
}


def _sized_to_model(n_params: int | None) -> dict[str, int]:
    if n_params is None:
        return dict(_MODEL_SIZED)
    return {key: max(1_000_000, min(ceiling, n_params // 4)) for key, ceiling in _MODEL_SIZED.items()}


def _set_dotted(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_user_config(path: str) -> dict[str, object]:
    """parallel.deepspeed_config's keys, flattened to dotted names."""
    try:
        user = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"parallel.deepspeed_config: cannot read '{path}': {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"parallel.deepspeed_config: '{path}' is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise UserError(f"parallel.deepspeed_config: '{path}' must hold a JSON object")
    return _flatten(user)


def config_precision(path: str) -> str | None:
    """bf16 or fp16 when parallel.deepspeed_config enables that section (what `parallel.precision: auto`
    then takes), else None."""
    user = _read_user_config(path)
    enabled = [name for name in ("bf16", "fp16") if user.get(f"{name}.enabled") in (True, 1)]
    if len(enabled) > 1:
        raise UserError(f"parallel.deepspeed_config: '{path}' enables both bf16 and fp16 — keep one")
    return enabled[0] if enabled else None


AUTO = "auto"  # the Hugging Face / accelerate placeholder: "fill this in from the training arguments"
# "auto" keys bigtrain leaves to DeepSpeed's own default (the Hugging Face Trainer sizes it from the hidden width).
_AUTO_DEEPSPEED_DEFAULT = {"zero_optimization.stage3_param_persistence_threshold"}
# A ds_config.json's optimizer and scheduler sections describe the AdamW bigtrain steps and the LR its loop
# sets (optim.*): checked against the recipe ("auto" filled), then left out of the config DeepSpeed gets.
_OWNED_SECTIONS = ("optimizer", "scheduler")
_SCHEDULER_TYPES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def recipe_optimizer_and_schedule(recipe) -> dict[str, tuple[object, str]]:
    """What a ds_config.json's optimizer and scheduler sections say, as the recipe decides it: dotted key ->
    (value, the recipe key it comes from). Their `type` keys are checked by name (_check_owned_sections)."""
    o = recipe.optim
    return {
        "optimizer.params.lr": (o.lr, "optim.lr"),
        "optimizer.params.betas": (list(o.betas), "optim.betas"),
        "optimizer.params.eps": (o.eps, "optim.eps"),
        "optimizer.params.weight_decay": (o.weight_decay, "optim.weight_decay"),
        "scheduler.params.warmup_min_lr": (0.0, "optim.warmup_steps, which start at 0"),
        "scheduler.params.warmup_min_ratio": (0.0, "optim.warmup_steps, which start at 0"),
        "scheduler.params.warmup_max_lr": (o.lr, "optim.lr"),
        "scheduler.params.warmup_num_steps": (o.warmup_steps, "optim.warmup_steps"),
        "scheduler.params.warmup_type": ("linear", "optim.warmup_steps, a linear warmup"),
        "scheduler.params.total_num_steps": (recipe.train.max_steps, "train.max_steps"),
        "scheduler.params.cos_min_ratio": (o.final_lr_ratio, "optim.final_lr_ratio"),
    }


def _agrees(value, ours) -> bool:
    return value == ours or (isinstance(ours, bool) and value in (0, 1) and bool(value) == ours)


def _contradiction(key: str, value, path: str, ours, source: str) -> UserError:
    return UserError(f"parallel.deepspeed_config: '{key}' is {json.dumps(value)} in {path} but the recipe gives "
                     f"{json.dumps(ours)} ({source}) — remove the key from {path} or change the recipe")


def _check_owned_sections(user: dict[str, object], recipe, path: str) -> None:
    """The optimizer and scheduler keys agree with the recipe ("auto" agrees with whatever it decides)."""
    decided = recipe_optimizer_and_schedule(recipe)
    for key, value in user.items():
        if key.split(".")[0] not in _OWNED_SECTIONS:
            continue
        if key == "optimizer.type" and str(value).lower() in ("adam", "adamw"):  # DeepSpeed's Adam is AdamW too
            continue
        if key == "scheduler.type" and value in _SCHEDULER_TYPES:
            if _SCHEDULER_TYPES[value] != recipe.optim.schedule:
                raise _contradiction(key, value, path, recipe.optim.schedule, "optim.schedule")
            continue
        if key in decided:
            if value != AUTO and not _agrees(value, decided[key][0]):
                raise _contradiction(key, value, path, *decided[key])
        elif value == AUTO or key.endswith(".type"):
            raise UserError(f"parallel.deepspeed_config: '{key}' is {json.dumps(value)} in {path}, which bigtrain "
                            f"cannot {'fill' if value == AUTO else 'train with'} (it steps its own AdamW and LR "
                            f"schedule, optim.*) — remove the key from {path}")


def build_deepspeed_config(recipe, world_size: int, n_params: int | None = None) -> dict:
    """The DeepSpeed config for this recipe, merged with parallel.deepspeed_config (extra keys only; "auto" values,
    as a Hugging Face / accelerate ds_config.json has them, filled from the recipe); bucket sizes and ZeRO-3's
    live / reuse limits scaled to a model of `n_params` parameters when given."""
    from_recipe = recipe_deepspeed_config(recipe, world_size)
    sized = _sized_to_model(n_params)
    config: dict = {}
    for key, default in {**_DEFAULTS, **sized}.items():
        _set_dotted(config, key, default)
    path = recipe.parallel.deepspeed_config
    if path:
        user = _read_user_config(path)
        _check_owned_sections(user, recipe, path)
        for key, value in user.items():
            if key.split(".")[0] in _OWNED_SECTIONS:
                continue
            if value == AUTO:
                if key in from_recipe or key in sized or key in _AUTO_DEEPSPEED_DEFAULT:
                    continue  # the recipe's value (set below), ours, or DeepSpeed's default
                raise UserError(f"parallel.deepspeed_config: '{key}' is \"auto\" in {path}, which bigtrain cannot "
                                f"fill — give it a value or remove it")
            if key in from_recipe and not _agrees(value, from_recipe[key][0]):
                raise _contradiction(key, value, path, *from_recipe[key])
            _set_dotted(config, key, value)
    for key, (value, _) in from_recipe.items():
        _set_dotted(config, key, value)
    return config
