"""Model registry and factory: `model.arch` name -> class, and `build_model(cfg, vocab_size)`.

Resolves the recipe's `model:` section (a named preset plus overrides) and the task's head
(language model or classifier) into a ModelSpec, builds the architecture on the requested
device and initialises its weights.

Resolving a recipe's model spec (`resolve_model_spec`; plan/model_check.py checks it) needs no torch, so `bigtrain launch`
validates it before starting any process; torch and the model classes load on first use of
`build_model`, `ARCHS`, `Decoder` or `Encoder`.
"""

from __future__ import annotations

import contextlib

import importlib
from typing import TYPE_CHECKING

from bigtrain.core.errors import UserError
from bigtrain.models.presets import PRESETS, ModelSpec, count_params, resolve_spec, spec_flops_per_token

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bigtrain.config import ModelConfig
    from bigtrain.models.transformer import Transformer

# Arch name -> (module under bigtrain.models, class): short names, imported on first use.
ARCH_CLASSES: dict[str, tuple[str, str]] = {"decoder": ("decoder", "Decoder"), "encoder": ("encoder", "Encoder")}

__all__ = [
    "ARCHS", "ARCH_CLASSES", "PRESETS", "Decoder", "Encoder", "ModelSpec", "build_model",
    "count_params", "resolve_model_spec", "spec_flops_per_token",
]


def _arch_class(arch: str) -> type[Transformer]:
    module, cls = ARCH_CLASSES[arch]
    return getattr(importlib.import_module(f"bigtrain.models.{module}"), cls)


def __getattr__(name: str):
    """The torch-backed names, loaded on first use."""
    if name == "ARCHS":
        return {arch: _arch_class(arch) for arch in ARCH_CLASSES}
    if name in ("Decoder", "Encoder"):
        return _arch_class(name.lower())
    raise AttributeError(f"module 'bigtrain.models' has no attribute {name!r}")


def resolve_model_spec(cfg: ModelConfig, vocab_size: int | None = None, *, head: str = "lm",
                       num_labels: int | None = None, pooling: str = "auto") -> ModelSpec:
    """The preset's values overlaid with cfg's non-None overrides, checked, plus the head.

    Raises UserError naming the key (`model.preset: unknown preset 'x' — choose one of ...`;
    `model.preset: preset 'bert-base' is an encoder preset — set model.arch: encoder`).
    vocab_size may be left out to inspect a shape before a tokenizer exists. head, num_labels
    and pooling are as for `build_model`, so `count_params` / `spec_flops_per_token` of the
    result describe exactly the model it would build.
    """
    if cfg.arch not in ARCH_CLASSES:
        raise UserError(f"model.arch: unknown arch '{cfg.arch}' — choose one of {', '.join(ARCH_CLASSES)}")
    return resolve_spec(cfg, vocab_size, head=head, num_labels=num_labels, pooling=pooling)


@contextlib.contextmanager
def skip_default_init():
    """While the model is constructed, Linear/Embedding/norm layers skip their own default init:
    `init_weights` sets every parameter right after, so drawing them twice is waste, and untouched memory is
    not resident (under ZeRO-3's zero.Init a module then exists whole without its pages being touched
    before it is partitioned)."""
    from torch import nn

    classes = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
    saved = {cls: cls.reset_parameters for cls in classes}
    try:
        for cls in classes:
            setattr(cls, "reset_parameters", lambda self: None)  # setattr: a deliberate, undone method swap
        yield
    finally:
        for cls, method in saved.items():
            setattr(cls, "reset_parameters", method)


def build_model(cfg: ModelConfig, vocab_size: int, *, device: torch.device | str = "cpu",
                head: str = "lm", num_labels: int | None = None, pooling: str = "auto") -> Transformer:
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
    import torch

    spec = resolve_model_spec(cfg, vocab_size, head=head, num_labels=num_labels, pooling=pooling)
    with torch.device(device), skip_default_init():
        model = _arch_class(spec.arch)(spec)
    lora = getattr(cfg, "lora", None)  # a ModelConfig's model.lora (other model settings objects have none)
    if lora is not None:  # adapters on the targeted Linears, the rest frozen (models/lora.py)
        from bigtrain.models.lora import apply_lora

        apply_lora(model, lora)
    model.init_weights()
    return model
