"""Decoder-only causal language model (GPT-2 style or Llama style, chosen by the ModelSpec).

Owns what makes the shared trunk (`transformer.Transformer`: embeddings, pre-norm blocks,
final norm, heads, init, counts) a decoder: causal attention, and an `lm_head` Linear
(tied to the token embedding unless spec.tie_embeddings is false) giving next-token logits.
With head="classify" it pools the last real token (`lengths - 1`) by default.
"""

from __future__ import annotations

from torch import nn

from bigtrain.models.presets import ModelSpec
from bigtrain.models.transformer import Transformer


def build_lm_head(spec: ModelSpec) -> nn.Linear:
    """d_model -> vocab, no bias (GPT-2 and Llama have none)."""
    assert spec.vocab_size is not None  # resolve_spec gives an LM head's spec its vocab_size
    return nn.Linear(spec.d_model, spec.vocab_size, bias=False)


class Decoder(Transformer):
    """Token ids (B, T) -> next-token logits (B, T, V), in the compute dtype (no upcast);
    with head="classify", class logits (B, num_labels)."""

    causal = True
    lm_head_name = "lm_head"
    build_lm_head = staticmethod(build_lm_head)
