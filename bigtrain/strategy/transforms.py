"""Model transforms a strategy applies to a finished model, in this order: activation checkpointing, then compile."""

from __future__ import annotations

from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward. State-dict keys stay unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (per-block compile keeps state-dict keys and compiles fast)."""
    for block in model.blocks:
        block.compile()


def apply_transforms(model: nn.Module, parallel_cfg) -> None:
    if parallel_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel_cfg.compile:
        apply_compile(model)
