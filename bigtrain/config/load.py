"""Reading a recipe: YAML through `yaml.safe_load`, `section.key=value` overrides, and the checked Config.

`load_config` reads a recipe, merges command-line overrides, checks every key and type (unknown
keys with a "did you mean", choices, finite numbers) in `build_config`, then the cross-field rules
in `validate` — all before anything is built. `dump_yaml` writes a Config back (the run dir's
config.yaml).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from bigtrain.config.schema import SECTIONS, Config, ConfigError, type_name
from bigtrain.config.validate import validate


class _NotFinite(ConfigError):
    """A float key got nan or ±inf (said as such, not as a type mismatch)."""


class _UnknownKey(ConfigError):
    """A mapping-valued key with a key it does not have (raised through Optional[...], unlike a type mismatch)."""



def load_config(recipe: str | os.PathLike, overrides: Sequence[str] = (), *, world_size: int | None = None) -> Config:
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


def load_raw(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
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
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a mapping of its keys (data.mixture's entries)
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
    raise ConfigError(f"{where}: {path} must be {type_name(tp)}, got {value!r}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
