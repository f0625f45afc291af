"""Self-attention, its masks and the key/value cache of generation.

Owns: attention masks (`prepare_attn_mask`; packed documents' `document_attention`), attention (fused QKV,
grouped-query, causal or bidirectional, optional per-head q/k norm, SDPA; FlexAttention for packed documents on
CUDA), and the key/value cache of generation (`KVCache`). Generation passes `positions` and a layer's cache
(packed documents pass positions, not a cache); without them the path is training's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from bigtrain.models.layers import RotaryEmbedding, build_norm
from bigtrain.models.presets import ModelSpec


def document_attention(documents: torch.Tensor, *, flex: bool) -> torch.Tensor | BlockMask:
    """The attention of packed documents, `documents` (B, T) each token's document id: a query attends to the keys
    of its own document at or before it (block-diagonal causal).

    flex=True (what a CUDA run uses): a FlexAttention BlockMask, which Attention hands to the compiled flex kernel;
    it skips every block of keys outside the query's documents and never holds a (T, T) mask per row. Else the
    dense (B, 1, T, T) bool mask for SDPA (CPU, and attention dropout, which flex does not have)."""
    B, T = documents.shape
    if flex:
        def same_document_causal(b, h, q, k):
            return (documents[b, q] == documents[b, k]) & (q >= k)
        return create_block_mask(same_document_causal, B, None, T, T, device=documents.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


_compiled_flex = None


def _flex_attention(on_cuda: bool):
    """flex_attention compiled once on CUDA (its fused kernel; eager flex is a slow reference); eager elsewhere (a
    CPU forward, as the tests check it: CPU flex has no backward)."""
    global _compiled_flex
    if not on_cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def prepare_attn_mask(attn_mask: torch.Tensor | BlockMask | None, causal: bool, n_queries: int | None = None
                      ) -> torch.Tensor | BlockMask | None:
    """A caller's boolean mask (True = may attend) made ready for SDPA, once per forward.

    Shapes: (B, 1, T, T) or (B, T, T) full masks, used as given (a causal model's caller
    includes causality, e.g. SFT's block-diagonal causal mask), or (B, 1, 1, T) key padding,
    which broadcasts over heads and queries. Key padding cannot express causality, so a
    causal model combines it with the causal mask: (B, 1, T, T).

    A query row that may attend to nothing (a padding row of a full mask, or a sequence with
    no real token) is a softmax over no keys: 0/0 = NaN in kernels that do not special-case
    it (recent CPU kernels return zeros, not every CUDA kernel or version does), and a NaN
    reaches the gradients even though the row's output is never used (0 * NaN = NaN in
    backward). Such rows instead attend to every key: rows with any allowed key are
    unchanged, so outputs at real positions are exactly what the mask says, and padding
    rows stay finite whatever the kernel. Key padding keeps its (B, 1, 1, T) shape.

    n_queries (generation with a KV cache): the last n_queries of the T keys are the queries, so a
    causal model's key padding becomes (B, 1, n_queries, T), query i seeing keys up to T - n_queries + i.
    """
    if attn_mask is None or isinstance(attn_mask, BlockMask):  # a BlockMask: document_attention's, as it is
        return attn_mask
    if attn_mask.dtype != torch.bool:
        raise ValueError(f"attn_mask must be bool (True = may attend), got {attn_mask.dtype}")
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)  # (B, T, T) -> (B, 1, T, T)
    if attn_mask.dim() != 4 or attn_mask.size(1) != 1:
        raise ValueError(f"attn_mask must be (B, 1, T, T), (B, T, T) or (B, 1, 1, T), got {tuple(attn_mask.shape)}")
    if causal and attn_mask.size(-2) == 1:
        T = attn_mask.size(-1)
        Tq = T if n_queries is None else n_queries
        attn_mask = attn_mask & torch.ones(Tq, T, dtype=torch.bool, device=attn_mask.device).tril(T - Tq)  # (B, 1, Tq, T)
    return attn_mask | ~attn_mask.any(dim=-1, keepdim=True)  # empty rows -> all keys


class LayerKV:
    """One layer's cached keys and values: (B, Hkv, max_len, hd) buffers, the first `length` positions filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.length = k, v, 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hd) after the cached positions; return every position so far (B, Hkv, S, hd)."""
        end = self.length + k.size(-2)
        if end > self.k.size(-2):
            raise ValueError(f"KV cache full: {end} positions > max_len {self.k.size(-2)}")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for positions already seen, so each generated token costs one
    position's forward, not the whole sequence's. Stored before the grouped-query expansion (n_kv_heads)."""

    def __init__(self, spec: ModelSpec, batch_size: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch_size, spec.n_kv_heads, max_len, spec.head_dim)
        self.layers = [LayerKV(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(spec.n_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return self.layers[0].length


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with one fused QKV projection.

    `causal=True` (decoder) masks the future via SDPA's is_causal; an explicit boolean
    attn_mask (True = may attend) replaces it when given, e.g. for packed SFT documents.
    `causal=False` (encoder) attends everywhere unless a mask says otherwise. Masks of shape
    (B, 1, T, T), (B, T, T) or (B, 1, 1, T) (key padding) broadcast over heads; the models
    pass them through `prepare_attn_mask` first.
    """

    def __init__(self, spec: ModelSpec, causal: bool):
        super().__init__()
        self.causal = causal
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.dropout = spec.dropout
        # q: n_heads heads, k and v: n_kv_heads heads each.
        self.qkv = nn.Linear(spec.d_model, (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim, bias=spec.qkv_bias)
        self.out_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.d_model, bias=spec.bias)
        # Qwen3: each head's q and k normalised over head_dim, before RoPE.
        self.q_norm = build_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.k_norm = build_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.rope = (RotaryEmbedding(spec.head_dim, spec.max_seq_len, spec.rope_theta, spec.rope_scaling)
                     if spec.position == "rope" else None)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        """x (B, T, C). Generation may give `positions` (for RoPE) and this layer's `cache`: the T new keys and
        values are appended and the queries attend to every cached position (attn_mask then covers them all)."""
        B, T, _ = x.shape  # (B, T, C)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (spec.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head and position
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        is_causal = self.causal and attn_mask is None
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, S, hd): the cached positions, then these T
            S = k.size(-2)
            if is_causal and S != T:  # queries are the last T positions; one query may see every key
                attn_mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
                is_causal = False

        if isinstance(attn_mask, BlockMask):  # packed documents on CUDA (document_attention)
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=attn_mask, enable_gqa=self.n_kv_heads != self.n_heads)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, q_size))  # (B, T, C)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, T, T) -> (B, 1, T, T), broadcast over heads
        native_gqa = False
        if self.n_kv_heads != self.n_heads:
            # SDPA's enable_gqa only reaches the flash kernel (CUDA, half precision, no mask);
            # elsewhere it would fall back to the slow math kernel, so expand k/v instead.
            native_gqa = attn_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            if not native_gqa:
                repeat = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=native_gqa,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, q_size)  # (B, T, H*hd)
        return self.out_proj(y)
