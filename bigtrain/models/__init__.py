"""Model registry and factory: `model.arch` name -> class, and `build_model(cfg, vocab_size)`.

Resolves the recipe's `model:` section (a named preset plus overrides) into a ModelSpec,
builds the architecture on the requested device and initialises its weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bigtrain.errors import UserError
from bigtrain.models.decoder import Decoder
from bigtrain.models.presets import PRESETS, ModelSpec, count_params, resolve_spec, spec_flops_per_token

if TYPE_CHECKING:
    from bigtrain.config import ModelConfig

ARCHS: dict[str, type[nn.Module]] = {"decoder": Decoder}

__all__ = [
    "ARCHS", "PRESETS", "Decoder", "ModelSpec",
    "build_model", "count_params", "resolve_model_spec", "spec_flops_per_token",
]


def resolve_model_spec(cfg: ModelConfig, vocab_size: int | None = None) -> ModelSpec:
    """The preset's values overlaid with cfg's non-None overrides, checked.

    Raises UserError naming the key (`model.preset: unknown preset 'x' — choose one of ...`).
    vocab_size may be left out to inspect a shape before a tokenizer exists.
    """
    if cfg.arch not in ARCHS:
        raise UserError(f"model.arch: unknown arch '{cfg.arch}' — choose one of {', '.join(ARCHS)}")
    return resolve_spec(cfg, vocab_size)


def build_model(cfg: ModelConfig, vocab_size: int, *, device: torch.device | str = "cpu") -> nn.Module:
    """Build and initialise the model cfg describes, its parameters on `device`.

    Deterministic given torch.manual_seed before the call. On device="meta" nothing is
    allocated; call `model.to_empty(device=...)` then `model.init_weights()` later.
    """
    spec = resolve_model_spec(cfg, vocab_size)
    with torch.device(device):
        model = ARCHS[spec.arch](spec)
    model.init_weights()
    return model
