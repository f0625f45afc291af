"""The Hugging Face encoder families: BertForMaskedLM, BertForSequenceClassification, RobertaForMaskedLM.

Per family, as data and small functions the generic modules call (`hf_config`, `hf_weights`):
config.json ↔ model keys (`encoder_keys`, `encoder_hf_config`), which class a spec exports to
(`encoder_export_class`), and the tensor-name map (`encoder_tensor_map`). BERT maps onto bigtrain's
encoder with its options set as BERT's: post-norm blocks (norm_position post, no final norm), a LayerNorm
on the embeddings, token-type embeddings (one segment: type 0 everywhere, as transformers' default
token_type_ids), exact-erf GELU (hidden_act "gelu"), the MLM head's dense + GELU + LayerNorm transform and
output bias, and for classification BERT's pooler (dense + tanh on the first token) before the classifier.

RoBERTa numbers positions from padding_idx + 1 (transformers' create_position_ids_from_input_ids): real
tokens of a right-padded row get padding_idx + 1, padding_idx + 2, ..., which is `position_offset =
pad_token_id + 1` over 0..T-1. Padding tokens get other positions in transformers, but their keys are
masked, so every real token's logits are the same; bigtrain's batches are right-padded. A left-padded
batch, or a pad token id inside a row, would number positions differently: not supported.
Torch-free, like hf_config.
"""

from __future__ import annotations

import json
from typing import Any, Callable

# `architectures` entry -> (family, head the folder holds)
ENCODER_CLASSES = {"BertForMaskedLM": ("bert", "lm"), "BertForSequenceClassification": ("bert", "classify"),
                   "RobertaForMaskedLM": ("roberta", "lm")}
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta."}  # the base model's prefix in HF tensor names
HEAD_PREFIXES = {"bert": ("cls.", "classifier."), "roberta": ("lm_head.", "classifier.")}
# HF tensors a folder may hold that are the same tensor as another (tied): never read, never written.
TIED_DUPLICATES = {"bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
                   "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias")}
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> gelu_approximate

_DEFAULTS = {  # transformers' BertConfig / RobertaConfig defaults of keys save_pretrained may leave out
    "bert": dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
                 pad_token_id=0, tie_word_embeddings=True, position_embedding_type="absolute", is_decoder=False,
                 add_cross_attention=False),
}
_DEFAULTS["roberta"] = dict(_DEFAULTS["bert"], pad_token_id=1)


def is_encoder_family(family: str) -> bool:
    return family in BASE_PREFIX


def hf_num_labels(config: dict) -> int:
    """Classifier outputs of a *ForSequenceClassification config (id2label, else num_labels, else 2)."""
    return len(config.get("id2label") or {}) or int(config.get("num_labels", 2))


def encoder_keys(family: str, config: dict, refuse: Callable, need: Callable) -> dict[str, Any]:
    """The recipe's model keys for a BERT / RoBERTa config.json (see hf_config.model_keys)."""
    c = {**_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}
    act = c["hidden_act"]
    if act not in ACTIVATIONS or (family == "roberta" and act != "gelu"):  # RoBERTa's MLM head is always erf GELU
        refuse("hidden_act", act, "gelu" if family == "roberta" else f"one of {', '.join(ACTIVATIONS)}")
    for key, wanted in (("position_embedding_type", "absolute"), ("is_decoder", False),
                        ("add_cross_attention", False)):
        if c[key] != wanted:
            refuse(key, c[key], f"needs {json.dumps(wanted)}")
    if not c["tie_word_embeddings"]:  # transformers then reads decoder.bias, and leaves the saved bias unused
        refuse("tie_word_embeddings", False, "an MLM head tied to the word embeddings, with one output bias")
    d, heads = need("hidden_size"), need("num_attention_heads")
    if d % heads:
        refuse("num_attention_heads", heads, f"must divide hidden_size={d}")
    offset = int(c["pad_token_id"]) + 1 if family == "roberta" else 0
    if c["max_position_embeddings"] <= offset:
        refuse("max_position_embeddings", c["max_position_embeddings"], f"more than pad_token_id + 1 = {offset}")
    dropouts = {float(c["hidden_dropout_prob"]), float(c["attention_probs_dropout_prob"])}
    return dict(arch="encoder", vocab_size=need("vocab_size"), n_layers=need("num_hidden_layers"), d_model=d,
                n_heads=heads, n_kv_heads=heads, d_ff=need("intermediate_size"),
                max_seq_len=c["max_position_embeddings"] - offset, norm="layernorm", position="learned", mlp="gelu",
                gelu_approximate=ACTIVATIONS[act], tie_embeddings=True, bias=True,
                qkv_bias=True, qk_norm=False, d_head=None, rope_scaling=None,
                dropout=dropouts.pop() if len(dropouts) == 1 else None, norm_eps=float(c["layer_norm_eps"]),
                init_std=float(c["initializer_range"]), norm_position="post", embedding_norm=True,
                type_vocab_size=int(c["type_vocab_size"]), position_offset=offset, pooler=True, sliding_window=None)


def encoder_export_class(spec, refuse: Callable[[str], None]) -> str:
    """The encoder family that computes exactly what `spec` does (bert | roberta), or refuse(what)."""
    if spec.norm_position != "post" or not spec.embedding_norm:
        refuse(f"model.arch=encoder with norm_position={spec.norm_position}"
               f"{'' if spec.embedding_norm else ' and no embedding_norm'} (bigtrain's default encoder)")
    for bad, what in ((spec.norm != "layernorm", f"norm={spec.norm}"), (spec.position != "learned", f"position={spec.position}"),
                      (spec.mlp != "gelu", f"mlp={spec.mlp}"), (not spec.bias or not spec.qkv_bias, "an encoder without biases"),
                      (spec.qk_norm, "qk_norm"), (spec.n_kv_heads != spec.n_heads, f"n_kv_heads={spec.n_kv_heads}"),
                      (spec.d_head not in (None, spec.d_model // spec.n_heads) or spec.d_model % spec.n_heads,
                       f"d_head={spec.head_dim} with d_model={spec.d_model}"),
                      (spec.type_vocab_size < 1, "type_vocab_size=0 (BERT always has token types)"),
                      (not spec.tie_embeddings, "tie_embeddings=false (BERT's untied head has two output biases)")):
        if bad:
            refuse(f"an encoder with {what}")
    if spec.position_offset == 0:
        if spec.head == "classify" and not (spec.pooler and spec.pooling == "first"):
            refuse("a classifier without pooler: true and pooling first (BertForSequenceClassification's)")
        return "bert"
    if spec.head == "classify":
        refuse(f"a classifier with position_offset={spec.position_offset} (RoBERTa style)")
    if spec.gelu_approximate != "none":
        refuse("gelu_approximate=tanh with position_offset (RoBERTa's MLM head is erf GELU)")
    return "roberta"


def encoder_hf_config(spec, family: str, *, pad_id: int | None, labels: list | None) -> dict[str, Any]:
    """The class-specific keys of config.json for an encoder spec (hf_config adds the common ones)."""
    classify = spec.head == "classify"
    architecture = {("bert", False): "BertForMaskedLM", ("bert", True): "BertForSequenceClassification",
                    ("roberta", False): "RobertaForMaskedLM"}[family, classify]
    config: dict[str, Any] = {
        "architectures": [architecture], "model_type": family, "hidden_size": spec.d_model,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads, "intermediate_size": spec.d_ff,
        "hidden_act": "gelu" if spec.gelu_approximate == "none" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": spec.dropout, "attention_probs_dropout_prob": spec.dropout, "classifier_dropout": None,
        "max_position_embeddings": spec.max_seq_len + spec.position_offset, "type_vocab_size": spec.type_vocab_size,
        "initializer_range": spec.init_std, "layer_norm_eps": spec.norm_eps, "position_embedding_type": "absolute",
        "is_decoder": False, "add_cross_attention": False, "tie_word_embeddings": spec.tie_embeddings,
        # RoBERTa's pad_token_id numbers its positions, so it is the offset's; BERT's only marks padding
        "pad_token_id": spec.position_offset - 1 if family == "roberta" else (0 if pad_id is None else pad_id),
    }
    if classify:
        names = labels if labels and len(labels) == spec.num_labels else [f"LABEL_{i}" for i in range(spec.num_labels)]
        config.update(id2label={str(i): str(name) for i, name in enumerate(names)},
                      label2id={str(name): i for i, name in enumerate(names)})
    return config


def encoder_tensor_map(family: str, spec, add: Callable[..., None]) -> None:
    """bigtrain name -> HF names of `spec`'s encoder as `family`, through add(ours, op, *theirs): the trunk,
    then the MLM head (head lm) or the pooler and classifier (head classify)."""
    e = f"{BASE_PREFIX[family]}embeddings."
    add("tok_emb.weight", "copy", f"{e}word_embeddings.weight")
    add("pos_emb.weight", "copy", f"{e}position_embeddings.weight")
    add("type_emb.weight", "copy", f"{e}token_type_embeddings.weight")
    for p in ("weight", "bias"):
        add(f"emb_norm.{p}", "copy", f"{e}LayerNorm.{p}")
    for i in range(spec.n_layers):
        b, h = f"blocks.{i}.", f"{BASE_PREFIX[family]}encoder.layer.{i}."
        for p in ("weight", "bias"):
            add(f"{b}attn.qkv.{p}", "cat", *(f"{h}attention.self.{name}.{p}" for name in ("query", "key", "value")))
            for ours, theirs in (("attn.out_proj", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                 ("mlp.in_proj", "intermediate.dense"), ("mlp.out_proj", "output.dense"),
                                 ("mlp_norm", "output.LayerNorm")):
                add(f"{b}{ours}.{p}", "copy", f"{h}{theirs}.{p}")
    if spec.head == "classify":
        if spec.pooler:
            for p in ("weight", "bias"):
                add(f"pooler.{p}", "copy", f"{BASE_PREFIX[family]}pooler.dense.{p}")
        for p in ("weight", "bias"):
            add(f"classifier.{p}", "copy", f"classifier.{p}")
        return
    head = {"bert": ("cls.predictions.", "transform.dense", "transform.LayerNorm"),
            "roberta": ("lm_head.", "dense", "layer_norm")}[family]
    prefix, dense, norm = head
    for p in ("weight", "bias"):
        add(f"mlm_head.transform.{p}", "copy", f"{prefix}{dense}.{p}")
        add(f"mlm_head.norm.{p}", "copy", f"{prefix}{norm}.{p}")
    add("mlm_head.proj.bias", "copy", f"{prefix}bias")
    add("mlm_head.proj.weight", "copy", f"{e}word_embeddings.weight")  # tied (an untied BERT is refused)
