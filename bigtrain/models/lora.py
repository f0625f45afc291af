"""LoRA (`model.lora`): low-rank adapters on a model's Linears, the rest of the model frozen.

A targeted Linear becomes a `LoRALinear`: the same `weight` and `bias` (frozen, under their names, so
checkpoints and `init_from` see the base model's tensors), plus `lora_A` (rank × in) and `lora_B` (out × rank),
trained, with

    y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ

B starts at zero, so training starts from the base model exactly; A is drawn like the rest of the model's weights
(N(0, 1/√(3·in)), the variance of PEFT's kaiming-uniform A, from a generator seeded by its state-dict name, so a
sharded model draws what an unsharded one does). Targets name bigtrain's Linears: `qkv` (the fused
query/key/value projection), `out` (attention's output projection), `mlp` (the MLP's in and out projections).
A classifier head (and its pooler) is new, so it trains in full.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.layers import constant_init_, normal_init_, param_seed, state_dict_name

if TYPE_CHECKING:
    from bigtrain.models.transformer import Transformer

TARGETS = {"qkv": ("attn.qkv",), "out": ("attn.out_proj",), "mlp": ("mlp.in_proj", "mlp.out_proj")}
TRAINED_HEADS = ("classifier.", "pooler.")  # new heads of a fine-tuned classifier: trained whole


class LoRALinear(nn.Linear):
    """nn.Linear plus a trained low-rank update (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, rank: int, alpha: float, dropout: float,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (…, out)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    @torch.no_grad()
    def reset_adapters(self, base_seed: int, prefix: str) -> None:
        """A from N(0, 1/√(3·in)) seeded by its name, B zero: the model starts as the base."""
        normal_init_(self.lora_A, 1.0 / math.sqrt(3 * self.in_features),
                     param_seed(base_seed, state_dict_name(f"{prefix}lora_A")))
        constant_init_(self.lora_B, 0.0)


def apply_lora(model: Transformer, lora) -> None:
    """Swap the targeted Linears of every block for LoRALinears sharing their weight and bias, then freeze all
    but the adapters (and a classifier head). Works on the meta device (init_weights draws the adapters)."""
    paths = [path for target in lora.targets for path in TARGETS[target]]
    for block in model.blocks:
        for path in paths:
            owner_path, _, attr = path.rpartition(".")
            owner = block.get_submodule(owner_path)
            base = getattr(owner, attr)
            adapted = LoRALinear(base.in_features, base.out_features, base.bias is not None, rank=lora.rank,
                                 alpha=lora.alpha, dropout=lora.dropout, device=base.weight.device,
                                 dtype=base.weight.dtype)
            adapted.weight, adapted.bias = base.weight, base.bias
            setattr(owner, attr, adapted)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trained(name))


def is_trained(name: str) -> bool:
    """Whether a LoRA model trains the tensor `name` (its adapters and a classifier head)."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name.startswith(TRAINED_HEADS)


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A, computed in fp32, in the wider of W's and the adapters' dtypes (a base held in bf16
    under mixed precision merges with fp32 adapters into fp32)."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(torch.promote_types(weight.dtype,
                                                                                                  lora_a.dtype))


class MergedLoRAWeights:
    """A WeightsReader over a LoRA checkpoint's reader: each adapted weight merged (`merged_weight`), the adapters
    left out — the tensors of the plain model, for export."""

    def __init__(self, reader, scaling: float):
        self.reader, self.scaling = reader, scaling

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        saved = self.reader.tensors()
        merged = {}
        for name, (dtype, shape) in saved.items():
            adapter = saved.get(f"{name.removesuffix('weight')}lora_A") if name.endswith(".weight") else None
            if not _is_adapter(name):  # an adapted weight comes out in merged_weight's dtype
                merged[name] = (torch.promote_types(dtype, adapter[0]) if adapter else dtype, shape)
        return merged

    def get(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        prefix = name.removesuffix("weight")
        if name.endswith(".weight") and f"{prefix}lora_A" in self.reader.tensors():
            return merged_weight(tensor, self.reader.get(f"{prefix}lora_A"), self.reader.get(f"{prefix}lora_B"),
                                 self.scaling)
        return tensor


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))
