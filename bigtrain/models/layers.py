"""Transformer building blocks below attention, and the deterministic init every model uses.

Owns: norm construction, rotary position embedding (optionally with Llama 3.1's frequency scaling), GELU and
SwiGLU MLPs, and parameter init that draws the same values on any device, dtype and sharding (`normal_rows`,
`write_rows_`, `init_module`). Attention, its masks and the KV cache are in attention.py; the `Block` that
joins them is in transformer.py.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.presets import ModelSpec


class ZeroParameter(Protocol):
    """What DeepSpeed ZeRO-3 adds to a parameter it partitions (`param.data` is then empty); deepspeed ships no
    types for them."""

    ds_tensor: torch.Tensor  # this rank's slice of the flattened tensor, padded to an equal share
    ds_shape: torch.Size  # the full tensor's shape
    ds_process_group: Any  # the group the parameter is partitioned over


@runtime_checkable
class _HasAdapters(Protocol):
    """A module with LoRA adapters to initialise (LoRALinear: models/lora.py imports this module, not the reverse)."""

    def reset_adapters(self, base_seed: int, prefix: str) -> None: ...


def build_norm(spec: ModelSpec, dim: int | None = None) -> nn.Module:
    """LayerNorm (with a bias iff spec.bias) or RMSNorm, as the spec says, over `dim` (default d_model)."""
    dim = spec.d_model if dim is None else dim
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=spec.norm_eps)  # F.rms_norm under the hood
    return nn.LayerNorm(dim, eps=spec.norm_eps, bias=spec.bias)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout, as in HF Llama: tests/unit/test_interop.py checks it).

    cos/sin tables are non-persistent buffers: they never enter a state_dict, and
    `reset_buffers()` recomputes them after `to_empty()` from the meta device. `scaling`, when
    given, is Llama 3.1's (factor, low_freq_factor, high_freq_factor, original_max_seq_len).
    """

    cos: torch.Tensor  # (max_seq_len, head_dim/2) buffers, registered in __init__
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float,
                 scaling: tuple[float, float, float, int] | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        # Angles in float32 whatever the buffer dtype: position * freq loses all precision in bf16.
        device = self.cos.device
        if self.scaling is None:
            inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim)
        else:
            inv_freq = llama3_inv_freq(self.head_dim, self.theta, self.scaling, device)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x (B, H, T, hd) by its positions: 0..T-1, or `positions` (T,) or (B, T) (generation:
        after cached tokens, or per row after left padding)."""
        if positions is None:
            T = x.size(-2)
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)  # (T, hd/2)
        else:
            cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)  # (T | B, T, hd/2)
            if positions.dim() == 2:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd/2): broadcast over heads
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def llama3_inv_freq(head_dim: int, theta: float, scaling: tuple[float, float, float, int],
                    device: torch.device) -> torch.Tensor:
    """Llama 3.1 RoPE frequencies (as transformers' `_compute_llama3_parameters`): wavelengths longer than
    original_max_seq_len / low_freq_factor are slowed by `factor`, shorter than .../ high_freq_factor kept,
    and those in between interpolated smoothly. (hd/2,) float32."""
    factor, low_freq_factor, high_freq_factor, original = scaling
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class GeluMLP(nn.Module):
    """GPT-2 MLP: d_model -> d_ff -> GELU (spec.gelu_approximate: tanh, as GPT-2, or exact) -> d_model."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.in_proj = nn.Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.out_proj = nn.Linear(spec.d_ff, spec.d_model, bias=spec.bias)
        self.approximate = spec.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.in_proj(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """Llama MLP: out_proj(silu(gate(x)) * up(x)), with gate and up fused into one Linear."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.in_proj = nn.Linear(spec.d_model, 2 * spec.d_ff, bias=spec.bias)  # [gate; up]
        self.out_proj = nn.Linear(spec.d_ff, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_ff) each
        return self.out_proj(F.silu(gate) * up)


MLPS: dict[str, type[GeluMLP | SwiGLU]] = {"gelu": GeluMLP, "swiglu": SwiGLU}


def state_dict_name(name: str) -> str:
    """A parameter's name as its state-dict key: wrapper components (`_checkpoint_wrapped_module`,
    `_orig_mod`) dropped, so init does not depend on which transforms a strategy applied."""
    return ".".join(part for part in name.split(".") if not part.startswith("_"))


def param_seed(base_seed: int, name: str) -> int:
    """The seed of one parameter's init: a function of (base seed, state-dict name) only."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid manual_seed


ROW_BLOCK_ELEMENTS = 1 << 20  # rows drawn from one generator: ~4 MB of fp32 per block


def normal_rows(shape: tuple[int, ...], std: float, seed: int, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) (dim 0) of an N(0, std) tensor of `shape`, fp32 on the CPU.

    Each block of rows (ROW_BLOCK_ELEMENTS elements) comes from a generator of its own, seeded by
    (seed, block index), so any row range is drawn without the rest of the tensor: a shard costs its own
    size plus at most two partial blocks, and the values do not depend on how the tensor is split."""
    row_numel = math.prod(shape[1:])
    per_block = max(1, ROW_BLOCK_ELEMENTS // max(row_numel, 1))
    out = torch.empty((stop - first, *shape[1:]), dtype=torch.float32)
    for block in range(first // per_block, -(-stop // per_block)):
        b0, b1 = block * per_block, min((block + 1) * per_block, shape[0])
        generator = torch.Generator().manual_seed(param_seed(seed, f"rows-{block}"))
        values = torch.empty((b1 - b0, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=generator)
        lo, hi = max(b0, first), min(b1, stop)
        out[lo - first:hi - first] = values[lo - b0:hi - b0]
    return out


def _dim0_shard_rows(param) -> tuple[int, int] | None:
    """The global rows [first, stop) of a DTensor sharded on dim 0 only over one mesh dim (FSDP2, HSDP:
    torch.chunk sizes), or None for any other layout."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = [i for i, p in enumerate(param.placements) if isinstance(p, Shard) and p.dim == 0]
    if len(sharded) != 1 or not all(isinstance(p, Replicate) for i, p in enumerate(param.placements) if i != sharded[0]):
        return None
    rows, parts = param.shape[0], param.device_mesh.size(sharded[0])
    index = param.device_mesh.get_coordinate()[sharded[0]]
    chunk = -(-rows // parts)
    return min(index * chunk, rows), min((index + 1) * chunk, rows)


@torch.no_grad()
def write_rows_(param: torch.Tensor, rows) -> None:
    """Write into `param` the values `rows(first, stop)` gives for the full tensor's rows [first, stop),
    asking only for the rows this rank holds, a block of rows (ROW_BLOCK_ELEMENTS) at a time so the
    temporary stays one block whatever the shard's size:
    - a DTensor sharded on dim 0 (FSDP2, HSDP): its own row range;
    - a DeepSpeed ZeRO-3 parameter (`ds_tensor`: this rank's slice of the flattened tensor): the rows that
      overlap the slice;
    - anything else: all rows (another DTensor layout takes its part of the full tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = param.to_local()
        span = _dim0_shard_rows(param)
        if span is None:
            full = rows(0, param.shape[0]).to(local.device)
            local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
            return
        for first, stop in _row_blocks(*span, math.prod(param.shape[1:])):
            local[first - span[0]:stop - span[0]].copy_(rows(first, stop))
        return
    partition = getattr(param, "ds_tensor", None)
    if partition is not None:
        zero = cast(ZeroParameter, param)
        numel, size = math.prod(zero.ds_shape), partition.ds_numel
        start = min(size * torch.distributed.get_rank(group=zero.ds_process_group), numel)
        stop = min(start + size, numel)
        row_numel = numel // zero.ds_shape[0] if stop > start else 1
        for first, last in _row_blocks(start // row_numel, -(-stop // row_numel), row_numel):
            lo, hi = max(start, first * row_numel), min(stop, last * row_numel)  # flat range of these rows we hold
            flat = rows(first, last).reshape(-1)
            partition.data[lo - start:hi - start].copy_(flat[lo - first * row_numel:hi - first * row_numel])
        return
    for first, stop in _row_blocks(0, param.shape[0], math.prod(param.shape[1:])):
        param[first:stop].copy_(rows(first, stop))


def _row_blocks(first: int, stop: int, row_numel: int):
    """[first, stop) cut at normal_rows' block boundaries: (start, end) row ranges of at most one block."""
    per_block = max(1, ROW_BLOCK_ELEMENTS // max(row_numel, 1))
    at = first
    while at < stop:
        end = min(stop, (at // per_block + 1) * per_block)
        yield at, end
        at = end


@torch.no_grad()
def normal_init_(param: torch.Tensor, std: float, seed: int) -> None:
    """N(0, std) from `normal_rows`: the same values on any device, in any dtype and under any sharding,
    each rank drawing only what it holds. Meta tensors stay empty."""
    if param.device.type == "meta":
        return
    shape = tuple(getattr(param, "ds_shape", param.shape))
    write_rows_(param, lambda first, stop: normal_rows(shape, std, seed, first, stop))


@torch.no_grad()
def constant_init_(param: torch.Tensor, value: float) -> None:
    """Fill with `value`, through write_rows_ so a ZeRO-3 partition (empty `param.data`) is filled too."""
    if param.device.type == "meta":
        return
    shape = tuple(getattr(param, "ds_shape", param.shape))
    write_rows_(param, lambda first, stop: torch.full((stop - first, *shape[1:]), float(value)))


@torch.no_grad()
def init_module(module: nn.Module, std: float, *, base_seed: int, prefix: str = "", done: set | None = None) -> None:
    """Default init of one module (named `prefix`): N(0, std) weights for Linear/Embedding, each
    drawn from its own generator seeded by (base_seed, state-dict name); zero biases, unit norm
    weights; rotary tables recomputed. Leaves other modules alone. Parameters whose id is in `done`
    (a tied weight already initialised under its first name) are skipped, and new ones are added."""
    done = set() if done is None else done
    if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
        done.add(id(module.weight))
        normal_init_(module.weight, std, param_seed(base_seed, state_dict_name(f"{prefix}weight")))
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        constant_init_(module.weight, 1.0)
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
        constant_init_(module.bias, 0.0)
    if isinstance(module, RotaryEmbedding):
        module.reset_buffers()
    if isinstance(module, _HasAdapters):  # a LoRALinear's adapters (models/lora.py)
        module.reset_adapters(base_seed, prefix)
