"""The recipe a command names, loaded with its `section.key=value` overrides and, under `accelerate launch`, the
launcher's flags as overrides too: one place, so train, check, prepare, bench and eval read a recipe alike."""

from __future__ import annotations

import os


def recipe_config(args, **kwargs):
    from bigtrain.config import load_config

    return load_config(args.recipe, with_launcher_choices(args.recipe, args.overrides), **kwargs)


def with_launcher_choices(recipe, overrides: list[str]) -> list[str]:
    """Under `accelerate launch`, its flags (--mixed_precision, --use_deepspeed, …) as parallel.* overrides;
    a flag that contradicts a value the recipe sets is a UserError naming both."""
    from launcher.accelerate_env import accelerate_overrides, launched_by_accelerate

    if not launched_by_accelerate(os.environ):
        return list(overrides)
    from bigtrain.config import load_raw

    return [*overrides, *accelerate_overrides(os.environ, load_raw(recipe, overrides), where=str(recipe))]
