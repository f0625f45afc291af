"""Model registry and factory: `model.arch` name -> class, and `build_model(cfg, vocab_size)`.

Resolves the recipe's `model:` section (a named preset plus overrides) and the task's head
(language model or classifier) into a ModelSpec, builds the architecture on the requested
device and initialises its weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bigtrain.errors import UserError
from bigtrain.models.decoder import Decoder
from bigtrain.models.encoder import Encoder
from bigtrain.models.presets import PRESETS, ModelSpec, count_params, resolve_spec, spec_flops_per_token

if TYPE_CHECKING:
    from bigtrain.config import ModelConfig

ARCHS: dict[str, type[nn.Module]] = {"decoder": Decoder, "encoder": Encoder}

__all__ = [
    "ARCHS", "PRESETS", "Decoder", "Encoder", "ModelSpec",
    "build_model", "count_params", "resolve_model_spec", "spec_flops_per_token",
]


def resolve_model_spec(cfg: ModelConfig, vocab_size: int | None = None, *, head: str = "lm",
                       num_labels: int | None = None, pooling: str = "auto") -> ModelSpec:
    """The preset's values overlaid with cfg's non-None overrides, checked, plus the head.

    Raises UserError naming the key (`model.preset: unknown preset 'x' — choose one of ...`;
    `model.preset: preset 'bert-base' is an encoder preset — set model.arch: encoder`).
    vocab_size may be left out to inspect a shape before a tokenizer exists. head, num_labels
    and pooling are as for `build_model`, so `count_params` / `spec_flops_per_token` of the
    result describe exactly the model it would build.
    """
    if cfg.arch not in ARCHS:
        raise UserError(f"model.arch: unknown arch '{cfg.arch}' — choose one of {', '.join(ARCHS)}")
    return resolve_spec(cfg, vocab_size, head=head, num_labels=num_labels, pooling=pooling)


def build_model(cfg: ModelConfig, vocab_size: int, *, device: torch.device | str = "cpu",
                head: str = "lm", num_labels: int | None = None, pooling: str = "auto") -> nn.Module:
    """Build and initialise the model cfg describes, its parameters on `device`.

    head="lm": decoder -> next-token logits, encoder -> masked-token logits, both (B, T, V).
    head="classify": a `classifier` Linear d_model -> num_labels over one pooled position
    and no LM head; forward(input_ids, attn_mask=None, *, lengths=None) -> (B, num_labels).
    pooling: "first" token, "last" real token (needs `lengths`), or "auto" (encoder: first,
    decoder: last). Trunk state-dict keys are the same for both heads, so an LM checkpoint
    loads into a classifier by name.

    Deterministic given torch.manual_seed before the call. On device="meta" nothing is
    allocated; call `model.to_empty(device=...)` then `model.init_weights()` later.
    """
    spec = resolve_model_spec(cfg, vocab_size, head=head, num_labels=num_labels, pooling=pooling)
    with torch.device(device):
        model = ARCHS[spec.arch](spec)
    model.init_weights()
    return model
