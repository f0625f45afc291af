"""Bidirectional encoder for masked-LM pretraining and classification (BERT style).

Owns what makes the shared trunk (`transformer.Transformer`: embeddings, blocks, final norm,
heads, init, counts) an encoder: attention without a causal mask, and BERT's MLM head.
With head="classify" it pools the first token by default (put [CLS] there).

Same layers as the decoder, so a BERT preset is: learned positions, LayerNorm, GELU MLP,
biases everywhere. Differences of the presets from the original BERT, on purpose (each is a
spec option, and a Hugging Face BERT or RoBERTa import sets them all to BERT's: norm_position
post, embedding_norm, type_vocab_size, position_offset, pooler, gelu_approximate none — the
same logits as transformers; see bigtrain/interop/hf_encoders.py):
  - pre-norm blocks plus a final norm (BERT is post-norm, with a LayerNorm on the
    embeddings): pre-norm trains stably without BERT's careful warmup; the first block's
    norm stands in for the embedding LayerNorm;
  - no token-type (segment) embeddings and no pooler (Linear + tanh over [CLS]): sentence
    pairs are separated by [SEP] alone, and the classifier reads the final-norm hidden
    state directly, as RoBERTa-style heads do;
  - GELU (in the blocks and the MLM head) uses the tanh approximation, not erf: they differ by < 1e-3.
So bert-base has 109.51M parameters with BERT's 30522-token vocabulary, MLM head included
(Hugging Face's BertForMaskedLM: 109.51M; BertModel with pooler: 109.48M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.layers import build_norm
from bigtrain.models.presets import ModelSpec
from bigtrain.models.transformer import Transformer


class MLMHead(nn.Module):
    """BERT's MLM head: transform (Linear d -> d, GELU, norm), then `proj` d -> vocab with an
    output bias vector (iff spec.bias); proj.weight is the token embedding when tied."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.transform = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.norm = build_norm(spec)
        assert spec.vocab_size is not None  # resolve_spec gives an LM head's spec its vocab_size
        self.proj = nn.Linear(spec.d_model, spec.vocab_size, bias=spec.bias)
        self.approximate = spec.gelu_approximate  # as the blocks' MLP

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) -> masked-token logits (B, T, V)."""
        return self.proj(self.norm(F.gelu(self.transform(h), approximate=self.approximate)))


class Encoder(Transformer):
    """Token ids (B, T) -> masked-token logits (B, T, V), every position seeing every other
    (key padding masked out when an attn_mask is given); with head="classify", class logits
    (B, num_labels)."""

    causal = False
    lm_head_name = "mlm_head"
    build_lm_head = MLMHead
