"""Model transforms a strategy applies to a finished model, in this order: activation checkpointing, then compile."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn


_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # what AC and compile add to parameter names


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under their state_dict names, the transforms' wrapper parts dropped (tied
    weights under every name): where engines write full tensors by name (init_from)."""
    named = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]:
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        named[name] = tensor
    return named


# Selective checkpointing keeps what is costly to recompute (torchtitan's op-level policy): matmuls and attention.
_SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    saved = getattr(op, "__name__", "").split(".")[0] in _SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> None:
    """Recompute each block's activations in backward: all of them (full), or all but its matmul and attention
    outputs (selective). State-dict keys stay unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    extra: dict[str, Any] = {"context_fn": _selective_context} if mode == "selective" else {}
    blocks = cast(nn.ModuleList, model.blocks)  # a Transformer's (nn.Module types attributes Tensor | Module)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, **extra)


def key_inductor_cache_by_cpu() -> Path:
    """Point torch.compile's kernel cache at one folder per CPU capability (AVX2, AVX512, ...).

    Inductor's cache key leaves out the CPU's vector ISA (torch 2.13): a graph compiled where torch
    runs AVX-512 kernels and reused where it runs AVX2 ones (another node sharing the cache folder,
    or ATEN_CPU_CAPABILITY set) gave NaN losses, and the reverse corrupted the heap. A folder the
    user chose via TORCHINDUCTOR_CACHE_DIR is kept, with the capability as a subfolder."""
    capability = f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if base is None:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    folder = Path(base) if Path(base).name == capability else Path(base) / capability
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (per-block compile keeps state-dict keys and compiles fast)."""
    key_inductor_cache_by_cpu()
    for block in cast(nn.ModuleList, model.blocks):  # a Transformer's (nn.Module types attributes Tensor | Module)
        block.compile()


def apply_transforms(model: nn.Module, parallel_cfg) -> None:
    if parallel_cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(model, parallel_cfg.activation_checkpointing)
    if parallel_cfg.compile:
        apply_compile(model)
