"""`accelerate launch` choices → `parallel.*` overrides, read from the environment accelerate gives each process.

`accelerate launch --mixed_precision bf16 --use_deepspeed --zero_stage 3 -m bigtrain train RECIPE` exports
ACCELERATE_MIXED_PRECISION=bf16, ACCELERATE_USE_DEEPSPEED=true, ACCELERATE_DEEPSPEED_ZERO_STAGE=3 (names as in
accelerate/utils/launch.py). A choice fills a key the recipe left unset; a recipe (or override) that set the key
to something else is a start-up error naming both. Accelerate's defaults are not choices: it writes
`--mixed_precision no` and `--dynamo_backend no` whether or not the user asked, so those mean "whatever the
recipe says". Nothing here imports accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from bigtrain.core.errors import UserError


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _unsupported(what: str, fix: str) -> Callable[[str], object]:
    def fail(value: str):
        raise UserError(f"accelerate launch {what} is not supported by bigtrain — {fix}")
    return fail


def _precision(value: str):
    value = value.strip().lower()
    if value == "fp8":
        raise UserError("accelerate launch --mixed_precision fp8 is not supported — use bf16 or fp16 "
                        "(or set parallel.precision in the recipe)")
    if value not in ("no", "fp16", "bf16"):
        _unknown("--mixed_precision", value)
    return None if value == "no" else value


def _zero_stage(value: str):
    if value.strip() not in ("1", "2", "3"):
        raise UserError(f"accelerate launch --zero_stage {value}: bigtrain's deepspeed strategy runs ZeRO stage 1, 2 "
                        f"or 3 (for plain data parallelism drop --use_deepspeed)")
    return int(value)


def _unknown(flag: str, value: str):
    raise UserError(f"accelerate launch {flag} {value}: unknown value")


def _offload(value: str):
    value = value.strip().lower()
    return value if value in ("none", "cpu", "nvme") else _unknown("offload device", value)


@dataclass(frozen=True)
class Choice:
    env: str                       # the variable accelerate exports
    flag: str                      # the `accelerate launch` flag that sets it (for messages)
    key: str                       # the parallel.* key it decides
    value: Callable[[str], object]  # env text → recipe value, or None when it is no choice


# One row per accelerate variable; the overrides come out in this order.
CHOICES: tuple[Choice, ...] = (
    Choice("ACCELERATE_USE_CPU", "--cpu", "device", lambda v: "cpu" if _true(v) else None),
    Choice("ACCELERATE_MIXED_PRECISION", "--mixed_precision", "precision", _precision),
    Choice("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed", "strategy", lambda v: "deepspeed" if _true(v) else None),
    Choice("ACCELERATE_DEEPSPEED_ZERO_STAGE", "--zero_stage", "zero_stage", _zero_stage),
    Choice("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "--offload_optimizer_device", "offload_optimizer", _offload),
    Choice("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "--offload_param_device", "offload_params", _offload),
    Choice("ACCELERATE_DEEPSPEED_CONFIG_FILE", "--deepspeed_config_file", "deepspeed_config",
           _unsupported("--deepspeed_config_file", "put the extra DeepSpeed keys in parallel.deepspeed_config")),
    Choice("ACCELERATE_USE_FSDP", "--use_fsdp", "strategy", lambda v: "fsdp" if _true(v) else None),
    Choice("FSDP_OFFLOAD_PARAMS", "--fsdp_offload_params", "offload_params", lambda v: "cpu" if _true(v) else None),
    Choice("FSDP_ACTIVATION_CHECKPOINTING", "--fsdp_activation_checkpointing", "activation_checkpointing",
           lambda v: True if _true(v) else None),
    Choice("ACCELERATE_DYNAMO_BACKEND", "--dynamo_backend", "compile", lambda v: None if v.upper() == "NO" else True),
    Choice("ACCELERATE_USE_MEGATRON_LM", "--use_megatron_lm", "strategy",
           _unsupported("--use_megatron_lm", "use parallel.strategy fsdp or deepspeed")),
)

# Recipe values that leave the decision open (so an accelerate choice is no contradiction).
_OPEN = {"strategy": "auto", "device": "auto", "precision": "auto"}
# Accelerate value → recipe values it agrees with, beyond equality.
_AGREES: dict[tuple[str, object], set[str]] = {("precision", "bf16"): {"bf16-pure"}}
# Flags that take no value on accelerate's command line.
_SWITCHES = {"--cpu", "--use_deepspeed", "--use_fsdp"}


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    """`accelerate launch` always exports ACCELERATE_MIXED_PRECISION to the processes it starts."""
    return "ACCELERATE_MIXED_PRECISION" in env


def accelerate_overrides(env: Mapping[str, str], raw: dict, *, where: str = "the recipe") -> list[str]:
    """`parallel.key=value` overrides for accelerate's choices in `env`; raw is the recipe mapping (with the
    user's overrides) so only keys the user set explicitly can contradict. Empty when not under accelerate."""
    if not launched_by_accelerate(env):
        return []
    explicit = raw.get("parallel") or {}
    chosen: dict[str, tuple[object, Choice]] = {}
    for choice in CHOICES:
        if choice.env not in env or (choice.env.startswith("FSDP_") and not _true(env.get("ACCELERATE_USE_FSDP", ""))):
            continue
        value = choice.value(env[choice.env])
        if value is None:
            continue
        mine = explicit.get(choice.key) if isinstance(explicit, dict) else None
        if mine is not None and mine != value and mine != _OPEN.get(choice.key) \
                and mine not in _AGREES.get((choice.key, value), ()):
            shown = choice.flag if choice.flag in _SWITCHES else f"{choice.flag} {env[choice.env]}"
            raise UserError(f"accelerate launch {shown} contradicts parallel.{choice.key}: {_yaml(mine)} in {where} "
                            f"— drop the flag or set parallel.{choice.key}={_yaml(value)}")
        if mine is None or mine == _OPEN.get(choice.key):
            chosen[choice.key] = (value, choice)
    return [f"parallel.{key}={_yaml(value)}" for key, (value, _) in chosen.items()]


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
