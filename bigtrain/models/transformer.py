"""The trunk every arch shares, and the head chosen at build time.

Owns: token (and learned position) embeddings, the stack of `Block`s (pre-norm, or post-norm as BERT) and
the final norm, under the same state-dict keys for every arch and head (`tok_emb`, `pos_emb`,
`blocks.N.*`, `norm.*`), so a checkpoint of one loads into another by name; BERT's options
(spec.norm_position="post" blocks and no final norm, `emb_norm`, token-type `type_emb`, a
`position_offset` into `pos_emb`, a `pooler` before the classifier); the two heads
(`spec.head`): the arch's language-model head, or a `classifier` over one pooled position;
weight init (safe after `to_empty()` from the meta device); parameter and FLOPs counts.

`Decoder` and `Encoder` differ only in data they declare: whether attention is causal, and
the name and builder of their language-model head. Everything runs through `forward`
(DDP syncs gradients through forward only). Knows nothing about distribution or precision. Every block
holds all of its own state, so strategies can wrap each one (activation checkpointing, FSDP) and call it as
`block(x, attn_mask=None)`.
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from bigtrain.models.attention import Attention, KVCache, LayerKV, document_attention, prepare_attn_mask
from bigtrain.models.layers import MLPS, build_norm, init_module
from bigtrain.models.presets import ModelSpec, spec_flops_per_token


def pool(h: torch.Tensor, pooling: str, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> (B, C): the first token, or the last real one (position lengths - 1)."""
    if pooling == "first":
        return h[:, 0]
    if lengths is None:
        raise ValueError("pooling='last' needs lengths: a LongTensor (B,) of real sequence lengths")
    return h[torch.arange(h.size(0), device=h.device), lengths.to(h.device) - 1]


def chunked_loss_sum(head: nn.Module, h: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ cross-entropy (fp32) of head(h) (B, T, V) against `labels` (B, T) (-100 ignored), `chunk` positions at a
    time: each chunk's logits are recomputed in backward instead of kept, so at most one chunk's (B, chunk, V)
    logits, their fp32 copy and gradient exist at once (a 128k vocabulary at seq 8192 would need 4 GB per
    sequence for the fp32 logits alone). chunk <= 0: the whole sequence as one chunk."""
    from torch.utils.checkpoint import checkpoint

    step = chunk if chunk > 0 else h.size(1)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(1), step):
        total = total + checkpoint(_chunk_loss_sum, head, h[:, start:start + step], labels[:, start:start + step],
                                   use_reentrant=False)
    return total


def _chunk_loss_sum(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h)  # (B, c, V)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="sum")


def _lengths_vary(T: int, *tensors: torch.Tensor) -> None:
    """Padded batches (a mask given) differ in length batch to batch: compiled blocks (parallel.compile) take the
    length as a variable from their first compile, instead of one graph per length (dims of size T marked)."""
    for tensor in tensors:
        for dim, size in enumerate(tensor.shape):
            if size == T and dim > 0:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); with
    spec.norm_position="post" (BERT): norm(x + attn(x)), then norm(x + mlp(x)). The norms keep
    their names (attn_norm, mlp_norm) either way."""

    def __init__(self, spec: ModelSpec, causal: bool):
        super().__init__()
        self.post_norm = spec.norm_position == "post"
        self.attn_norm = build_norm(spec)
        self.attn = Attention(spec, causal=causal)
        self.mlp_norm = build_norm(spec)
        self.mlp = MLPS[spec.mlp](spec)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        if self.post_norm:
            h = self.attn(x, attn_mask, positions=positions, cache=cache)  # (B, T, C)
            x = self.attn_norm(x + (self.dropout(h) if self.dropout is not None else h))
            h = self.mlp(x)  # (B, T, C)
            return self.mlp_norm(x + (self.dropout(h) if self.dropout is not None else h))
        h = self.attn(self.attn_norm(x), attn_mask, positions=positions, cache=cache)  # (B, T, C)
        x = x + (self.dropout(h) if self.dropout is not None else h)
        h = self.mlp(self.mlp_norm(x))  # (B, T, C)
        return x + (self.dropout(h) if self.dropout is not None else h)

    def residual_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The Linears that write into the residual stream (GPT-2 scales their init)."""
        return self.attn.out_proj, self.mlp.out_proj


class Transformer(nn.Module):
    """Token ids (B, T) -> logits: (B, T, V) for head="lm", (B, num_labels) for head="classify".

    An arch subclass sets `causal`, `lm_head_name` and `build_lm_head` (spec -> module whose
    output projection is itself when an nn.Linear, else its `.proj`). With head="classify"
    no LM head is built, so every parameter gets a gradient (DDP needs no unused-parameter search).
    """

    causal: ClassVar[bool]
    lm_head_name: ClassVar[str]

    @staticmethod
    def build_lm_head(spec: ModelSpec) -> nn.Module:
        """Set by each arch subclass (a static method, or the head's class itself)."""
        raise NotImplementedError

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.vocab_size is None:
            raise ValueError(f"{type(self).__name__} needs spec.vocab_size")
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_emb = (nn.Embedding(spec.max_seq_len + spec.position_offset, spec.d_model)
                        if spec.position == "learned" else None)
        # BERT: token types (one segment here: row 0 is added everywhere), a norm on the summed embeddings
        self.type_emb = nn.Embedding(spec.type_vocab_size, spec.d_model) if spec.type_vocab_size else None
        self.emb_norm = build_norm(spec) if spec.embedding_norm else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.blocks = nn.ModuleList(Block(spec, causal=self.causal) for _ in range(spec.n_layers))
        self.norm = build_norm(spec) if spec.norm_position == "pre" else None  # post-norm blocks end normed
        if spec.head == "classify":
            # BERT's pooler: Linear + tanh over the pooled token
            self.pooler = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias) if spec.pooler else None
            self.classifier_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
            assert spec.num_labels is not None  # resolve_spec gives a "classify" spec its num_labels
            self.classifier = nn.Linear(spec.d_model, spec.num_labels, bias=spec.bias)
        else:
            setattr(self, self.lm_head_name, type(self).build_lm_head(spec))
        self._tie_weights()

    def _output_projection(self) -> nn.Linear | None:
        """The Linear that maps to the vocabulary (None with head="classify")."""
        head = getattr(self, self.lm_head_name, None)
        return head if head is None or isinstance(head, nn.Linear) else head.proj

    def _tie_weights(self) -> None:
        projection = self._output_projection()
        if self.spec.tie_embeddings and projection is not None:
            projection.weight = self.tok_emb.weight

    def forward(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                lengths: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, labels: torch.Tensor | None = None, loss_chunk: int = 0,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); attn_mask None or bool, True = may attend (see attention.prepare_attn_mask):
        (B, 1, T, T) / (B, T, T), or (B, 1, 1, T) key padding. None: causal for the decoder,
        everywhere for the encoder. lengths (B,) real lengths: needed by pooling="last",
        ignored otherwise. Returns (B, T, V) for head="lm", (B, num_labels) for head="classify".

        Generation (bigtrain/eval/generate.py) may also give `positions` (T,) or (B, T) of the tokens (default
        0..T-1, or after the cached ones) and a `cache`: the tokens follow the cache.length cached ones,
        whose keys and values the cache holds, and a key padding attn_mask is (B, 1, 1, cache.length + T).

        With `labels` (B, T) (-100: no target), head="lm" returns the summed token cross-entropy instead of the
        logits, computed `loss_chunk` positions at a time (`chunked_loss_sum`): inside forward, so sharding
        strategies' hooks see the head's weights used as usual.

        `documents` (B, T) (data.document_mask, instead of attn_mask): each token's document id in a packed window;
        a token attends only within its document (`document_attention`: FlexAttention on CUDA, a dense mask
        elsewhere or with attention dropout)."""
        T = input_ids.size(1)
        past = 0 if cache is None else cache.length
        if past + T > self.spec.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len {self.spec.max_seq_len}")
        if cache is not None and positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        mask: torch.Tensor | BlockMask | None = attn_mask  # documents' may be a FlexAttention BlockMask
        if documents is not None:
            mask = document_attention(documents, flex=documents.is_cuda and self.spec.dropout == 0)
        mask = prepare_attn_mask(mask, causal=self.causal, n_queries=T if cache is not None else None)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.type_emb is not None:
            x = x + self.type_emb.weight[0]  # (C,): token type 0 everywhere
        if self.pos_emb is not None:
            # (T, C) broadcast over the batch, or (B, T, C) at given positions; rows from position_offset
            # (RoBERTa: padding_idx + 1, the positions transformers gives a right-padded batch's real tokens)
            offset = self.spec.position_offset
            x = x + (self.pos_emb.weight[offset:offset + T] if positions is None else self.pos_emb(positions + offset))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        if self.dropout is not None:
            x = self.dropout(x)
        if isinstance(mask, torch.Tensor) and cache is None:
            _lengths_vary(T, x, mask)
        for i, block in enumerate(self.blocks):
            if positions is None:  # training's call, which strategies' wrappers see
                x = block(x, attn_mask=mask)  # (B, T, C)
            else:
                x = block(x, attn_mask=mask, positions=positions, cache=None if cache is None else cache.layers[i])
        if self.spec.head == "classify":
            return self._classify(x, lengths)  # (B, K)
        head, h = getattr(self, self.lm_head_name), x if self.norm is None else self.norm(x)
        if labels is not None:  # the loss, never the whole (B, T, V) logits
            return chunked_loss_sum(head, h, labels, loss_chunk)
        return head(h)  # (B, T, V)

    def _classify(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The classifier head: (B, T, C) -> (B, K) logits from one pooled position."""
        assert self.spec.pooling is not None  # resolve_spec gives a "classify" spec its pooling
        h = pool(x, self.spec.pooling, lengths)  # (B, C)
        if self.norm is not None:
            h = self.norm(h)  # the norm is per position
        if self.pooler is not None:
            h = torch.tanh(self.pooler(h))
        if self.classifier_dropout is not None:
            h = self.classifier_dropout(h)
        return self.classifier(h)  # (B, K)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, init_std) for Linear/Embedding weights, zero biases, unit norm weights; the
        residual output projections get init_std / sqrt(2 * n_layers) (GPT-2). Each weight is
        drawn from generators seeded by (seed, its state-dict name, block of rows) (layers.normal_rows),
        each rank drawing only the rows it holds, so a sharded model (FSDP DTensors, ZeRO-3
        partitions) gets exactly the weights of an unsharded one. seed defaults to
        torch.initial_seed() (the last torch.manual_seed). Recomputes rotary tables and re-ties the
        head, so it also finishes a model made with `to_empty()`."""
        base_seed = torch.initial_seed() if seed is None else seed
        self._tie_weights()  # to_empty() gives each module its own new Parameter, untying them
        residual = {id(proj) for block in self.blocks for proj in cast(Block, block).residual_projections()}
        residual_std = self.spec.init_std / math.sqrt(2 * self.spec.n_layers)
        done: set[int] = set()  # a tied weight is drawn once, under its first name (tok_emb.weight)
        for name, module in self.named_modules():
            std = residual_std if id(module) in residual else self.spec.init_std
            init_module(module, std, base_seed=base_seed, prefix=f"{name}." if name else "", done=done)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once. exclude_embeddings drops the token, position and
        token-type tables (an untied output projection stays: it is a matmul, not a lookup)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            for table in (self.pos_emb, self.type_emb):
                if table is not None:
                    n -= table.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_matmul + 12 * n_layers * d_model * seq_len, with
        N_matmul = weights of every Linear in the blocks + the head's (lm head d_model * vocab,
        counted even when tied; + d_model^2 for the MLM transform; or for head="classify" just
        the classifier's d_model * num_labels). See presets.spec_flops_per_token."""
        return spec_flops_per_token(self.spec, seq_len)
