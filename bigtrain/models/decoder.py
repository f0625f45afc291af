"""Decoder-only causal language model (GPT-2 style or Llama style, chosen by the ModelSpec).

Owns: embeddings, the stack of pre-norm blocks, final norm and lm head; weight init
(`init_weights`, safe after `to_empty()` from the meta device); parameter and FLOPs
counts. Knows nothing about distribution or precision policy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigtrain.models.layers import Block, build_norm, init_module
from bigtrain.models.presets import ModelSpec, spec_flops_per_token


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V), in the compute dtype (no upcast)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.vocab_size is None:
            raise ValueError("Decoder needs spec.vocab_size")
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(spec.max_seq_len, spec.d_model) if spec.position == "learned" else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.blocks = nn.ModuleList(Block(spec, causal=True) for _ in range(spec.n_layers))
        self.norm = build_norm(spec)
        self.lm_head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self._tie_weights()

    def _tie_weights(self) -> None:
        if self.spec.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); attn_mask None (causal) or bool (B, 1, T, T) / (B, T, T), True = may attend."""
        T = input_ids.size(1)
        if T > self.spec.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.spec.max_seq_len}")
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[:T]  # (T, C) broadcast over the batch
        if self.dropout is not None:
            x = self.dropout(x)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)  # (B, T, C)
        return self.lm_head(self.norm(x))  # (B, T, V)

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for Linear/Embedding weights, zero biases, unit norm weights; the
        residual output projections get init_std / sqrt(2 * n_layers) (GPT-2). Recomputes
        rotary tables and re-ties the head, so it also finishes a model made with `to_empty()`."""
        self._tie_weights()  # to_empty() gives each module its own new Parameter, untying them
        for module in self.modules():
            init_module(module, self.spec.init_std)
        residual_std = self.spec.init_std / math.sqrt(2 * self.spec.n_layers)
        for block in self.blocks:
            for proj in block.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once. exclude_embeddings drops the token and position
        tables (an untied lm_head stays: it is a matmul, not a lookup)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * n_layers * d_model * seq_len, with
        N_matmul = weights of every Linear in the blocks + d_model * vocab for the lm head
        (counted even when tied). See presets.spec_flops_per_token."""
        return spec_flops_per_token(self.spec, seq_len)

