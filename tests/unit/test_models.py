"""Tests for bigtrain/models/: presets, spec resolution, Decoder and Encoder behaviour, heads,
attention masks, counts and init."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bigtrain.core.errors import UserError
from bigtrain.models import (
    ARCHS, PRESETS, Decoder, Encoder, build_model, count_params, resolve_model_spec, spec_flops_per_token,
)
from bigtrain.models.attention import prepare_attn_mask
from bigtrain.models.presets import PRESET_ARCH, SPEC_FIELDS

VOCAB = 97
LLAMA_STYLE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)


def model_cfg(preset: str = "debug", arch: str = "decoder", **overrides) -> SimpleNamespace:
    """Stand-in for config.ModelConfig: every override None unless given."""
    fields = {name: None for name in SPEC_FIELDS}
    fields.update(overrides)
    return SimpleNamespace(arch=arch, preset=preset, **fields)


def build(seed: int = 0, head: str = "lm", num_labels: int | None = None, pooling: str = "auto",
          **overrides) -> Decoder | Encoder:
    torch.manual_seed(seed)
    return build_model(model_cfg(**overrides), VOCAB, head=head, num_labels=num_labels, pooling=pooling).eval()


def tokens(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


STYLES = {"gpt2": {}, "llama": dict(LLAMA_STYLE, n_kv_heads=2)}
# Every BERT / RoBERTa option of the spec (what a Hugging Face encoder import sets).
BERT_OPTIONS = dict(norm_position="post", embedding_norm=True, type_vocab_size=2, position_offset=2, pooler=True,
                    gelu_approximate="none")


def test_presets_fill_every_field_and_registry_has_both_archs():
    assert set(PRESETS) == {"debug", "gpt2-124m", "gpt2-355m", "llama-1b", "llama-8b",
                            "bert-tiny", "bert-base", "bert-large"}
    for values in PRESETS.values():
        assert set(values) == set(SPEC_FIELDS)
    assert set(PRESET_ARCH) == set(PRESETS)
    assert set(PRESET_ARCH.values()) == {None, *ARCHS}
    assert ARCHS == {"decoder": Decoder, "encoder": Encoder}


def test_overrides_replace_preset_values_and_none_keeps_them():
    spec = resolve_model_spec(model_cfg("gpt2-124m", n_layers=3, dropout=0.1), vocab_size=50257)
    assert (spec.n_layers, spec.dropout, spec.d_model, spec.vocab_size) == (3, 0.1, 768, 50257)


@pytest.mark.parametrize("style", STYLES)
def test_forward_shape_and_dtype(style):
    logits = build(**STYLES[style])(tokens(B=3, T=10))
    assert logits.shape == (3, 10, VOCAB)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("style", STYLES)
def test_causal_changing_token_t_leaves_earlier_logits(style):
    model = build(**STYLES[style])
    ids = tokens(B=1, T=12)
    changed = ids.clone()
    t = 7
    changed[0, t] = (ids[0, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("style", STYLES)
def test_attn_mask_path_matches_is_causal_path(style):
    model = build(**STYLES[style])
    ids = tokens(B=2, T=9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(model(ids, attn_mask=causal.expand(2, 1, 9, 9)), expected)
        torch.testing.assert_close(model(ids, attn_mask=causal.expand(2, 9, 9)), expected)


def test_tied_embeddings_share_one_parameter_and_untied_do_not():
    tied = build()
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    d = tied.spec.d_model
    assert untied.num_params() - tied.num_params() == VOCAB * d
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - VOCAB * d - 256 * d
    # An untied head is a matmul, not a lookup: it stays in the non-embedding count.
    assert untied.num_params(exclude_embeddings=True) == tied.num_params(exclude_embeddings=True) + VOCAB * d


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_embeddings=False),
    dict(LLAMA_STYLE, n_kv_heads=2),
    dict(LLAMA_STYLE, n_kv_heads=1, tie_embeddings=False, n_layers=3),
    dict(norm="layernorm", bias=False, mlp="swiglu", position="rope"),
    dict(norm="rmsnorm", bias=True, d_ff=100),
])
def test_count_params_matches_built_model(overrides):
    model = build(**overrides)
    assert count_params(model.spec) == model.num_params()


@pytest.mark.parametrize("preset, vocab, expected", [
    ("gpt2-124m", 50257, 124.4e6),
    ("llama-1b", 128256, 1.236e9),
    ("llama-8b", 128256, 8.03e9),
])
def test_big_preset_param_counts_match_public_models(preset, vocab, expected):
    n = count_params(resolve_model_spec(model_cfg(preset), vocab_size=vocab))
    assert abs(n - expected) / expected < 0.01


def test_flops_per_token_matches_hand_formula_for_debug():
    model = build()
    L, d, ff, T = 2, 64, 256, 128
    per_block = d * 3 * d + d * d + d * ff + ff * d  # qkv, out_proj, mlp in, mlp out
    n_matmul = L * per_block + d * VOCAB  # + lm head (tied, still a matmul)
    expected = 6 * n_matmul + 12 * L * d * T
    assert model.flops_per_token(T) == expected == spec_flops_per_token(model.spec, T)


def test_gqa_with_one_kv_head_runs_and_sizes_qkv():
    model = build(**LLAMA_STYLE, n_kv_heads=1)
    d, n_heads = 64, 4
    assert model.blocks[0].attn.qkv.weight.shape == (d + 2 * (d // n_heads) * 1, d)
    logits = model(tokens(T=8))
    assert logits.shape == (2, 8, VOCAB) and logits.isfinite().all()


def test_init_is_deterministic_under_manual_seed():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_init_values_follow_gpt2_scheme():
    model = build(n_layers=8, d_model=128, n_heads=4, d_ff=512)
    block = model.blocks[0]
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)
    assert torch.all(block.attn.qkv.bias == 0)
    std = model.spec.init_std
    assert block.mlp.in_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert block.mlp.out_proj.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # sqrt(2*8) = 4


@pytest.mark.parametrize("style", STYLES)
def test_meta_build_then_to_empty_and_init_weights_gives_finite_outputs(style):
    torch.manual_seed(0)
    model = build_model(model_cfg(**STYLES[style]), VOCAB, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight  # tie survives to_empty
    assert model(tokens()).isfinite().all()


def test_state_dict_holds_only_parameters_no_rope_cache():
    model = build(**LLAMA_STYLE)
    param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert set(model.state_dict()) == param_names
    assert not any("rope" in name for name in model.state_dict())


def test_blocks_are_callable_alone():
    model = build()
    x = torch.randn(2, 5, model.spec.d_model)
    assert model.blocks[0](x, attn_mask=None).shape == x.shape


def test_bf16_autocast_forward_on_cpu():
    model = build(**STYLES["llama"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens())
    assert logits.dtype == torch.bfloat16
    assert logits.float().isfinite().all()


def test_dropout_modules_only_when_dropout_positive():
    assert not any(isinstance(m, torch.nn.Dropout) for m in build().modules())
    assert any(isinstance(m, torch.nn.Dropout) for m in build(dropout=0.1).modules())


@pytest.mark.parametrize("overrides, key", [
    (dict(preset="nope"), "model.preset"),
    (dict(arch="nope"), "model.arch"),
    (dict(d_model=100, n_heads=3), "model.n_heads"),
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(position="alibi"), "model.position"),
    (dict(mlp="relu"), "model.mlp"),
    (dict(norm_position="middle"), "model.norm_position"),
    (dict(type_vocab_size=-1), "model.type_vocab_size"),
    (dict(position="rope", position_offset=2), "model.position_offset"),
])
def test_bad_model_config_raises_user_error_naming_key(overrides, key):
    with pytest.raises(UserError) as err:
        resolve_model_spec(model_cfg(**overrides))
    message = str(err.value)
    assert message.startswith(key + ":")
    assert "\n" not in message


def test_unknown_preset_message_lists_choices():
    with pytest.raises(UserError, match="unknown preset 'x' — choose one of debug, gpt2-124m"):
        build_model(model_cfg("x"), VOCAB)


def test_overriding_n_heads_of_a_multi_head_preset_keeps_it_multi_head():
    from bigtrain.config import ModelConfig
    from bigtrain.models import resolve_model_spec

    spec = resolve_model_spec(ModelConfig(preset="debug", d_model=384, n_heads=6))
    assert spec.n_kv_heads == 6
    llama = resolve_model_spec(ModelConfig(preset="llama-1b", n_heads=16))
    assert llama.n_kv_heads == 8  # grouped-query presets keep their kv heads


# --------------------------------------------------------------------------- encoder and heads

ARCH_NAMES = ("decoder", "encoder")
HEAD_KEYS = ("lm_head", "mlm_head", "classifier")


def key_padding(lengths: list[int], T: int) -> torch.Tensor:
    """(B, 1, 1, T) bool, True at real tokens (as tasks.py builds it)."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def fill_padding(ids: torch.Tensor, lengths: list[int], value: int) -> torch.Tensor:
    out = ids.clone()
    for row, n in enumerate(lengths):
        out[row, n:] = value
    return out


def test_debug_preset_builds_either_arch_from_model_arch():
    assert isinstance(build(arch="decoder"), Decoder)
    encoder = build(arch="encoder")
    assert isinstance(encoder, Encoder) and encoder.spec.arch == "encoder"
    assert not any(block.attn.causal for block in encoder.blocks)
    assert encoder(tokens(B=3, T=10)).shape == (3, 10, VOCAB)


def test_encoder_is_bidirectional():
    model = build(arch="encoder")
    ids = tokens(B=1, T=12)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    for t in range(12):  # every position, before the change included, sees token 9
        assert not torch.allclose(before[:, t], after[:, t])
    with torch.no_grad():  # an all-True mask is the same as no mask
        torch.testing.assert_close(model(ids, attn_mask=torch.ones(1, 1, 12, 12, dtype=torch.bool)), before)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_key_padding_mask_makes_real_positions_independent_of_padding(arch):
    model = build(arch=arch)
    lengths, T = [10, 6, 1], 10
    mask = key_padding(lengths, T)
    ids = tokens(B=3, T=T)
    with torch.no_grad():
        a = model(fill_padding(ids, lengths, 0), attn_mask=mask)
        b = model(fill_padding(ids, lengths, 5), attn_mask=mask)
        for row, n in enumerate(lengths):
            torch.testing.assert_close(a[row, :n], b[row, :n])
            # ... and equal to running the real tokens alone, unpadded and unmasked
            torch.testing.assert_close(a[row, :n], model(ids[row:row + 1, :n])[0])
        assert not torch.allclose(a[1, 6:], b[1, 6:])  # the padding positions did change


def test_decoder_adds_causality_to_a_key_padding_mask():
    model = build()
    ids = tokens(B=2, T=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn_mask=key_padding([8, 8], 8)), model(ids))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_padding_rows_that_attend_to_nothing_give_no_nan_in_outputs_or_grads(arch):
    model = build(arch=arch).train()
    T = 8
    ids = tokens(B=3, T=T)
    # Row 0: a full (B, 1, T, T) mask whose padding rows (queries 5..7) may attend to nothing,
    # as SFT's packed mask has; row 1: key padding; row 2: an empty sequence.
    full = torch.ones(T, T, dtype=torch.bool).tril() if arch == "decoder" else torch.ones(T, T, dtype=torch.bool)
    full[:, 5:] = False
    full[5:, :] = False
    mask = torch.stack([full, key_padding([4], T)[0, 0].expand(T, T), torch.zeros(T, T, dtype=torch.bool)])[:, None]
    logits = model(ids, attn_mask=mask)  # (B, T, V)
    assert logits.isfinite().all()
    logits[0, :5].sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name


def test_prepare_attn_mask_leaves_no_empty_row_and_keeps_rows_with_a_key():
    T = 6
    full = torch.ones(T, T, dtype=torch.bool).tril()
    full[4:, :] = False  # padding queries: attend to nothing
    empty_sequence = torch.zeros(1, 1, 1, T, dtype=torch.bool)
    prepared = prepare_attn_mask(full.expand(2, T, T), causal=True)  # (B, T, T) -> (B, 1, T, T)
    assert prepared.shape == (2, 1, T, T)
    torch.testing.assert_close(prepared[:, 0, :4], full[:4].expand(2, 4, T))  # rows with a key: as given
    assert prepared[:, 0, 4:].all()  # empty rows: every key
    padding = key_padding([6, 3], T)
    assert torch.equal(prepare_attn_mask(padding, causal=False), padding)  # (B, 1, 1, T), not materialised
    assert torch.equal(prepare_attn_mask(padding, causal=True),
                       padding & torch.ones(T, T, dtype=torch.bool).tril())  # (B, 1, T, T)
    assert prepare_attn_mask(empty_sequence, causal=False).all()
    assert prepare_attn_mask(None, causal=True) is None
    with pytest.raises(ValueError, match="bool"):
        prepare_attn_mask(torch.zeros(1, 1, 1, T), causal=False)


def test_mlm_head_is_tied_to_the_token_embedding_with_an_output_bias():
    model = build(arch="encoder")
    head = model.mlm_head
    assert head.proj.weight is model.tok_emb.weight
    assert head.proj.bias.shape == (VOCAB,)
    assert head.transform.weight.shape == (64, 64) and isinstance(head.norm, torch.nn.LayerNorm)
    assert not hasattr(model, "lm_head")
    untied = build(arch="encoder", tie_embeddings=False)
    assert untied.mlm_head.proj.weight is not untied.tok_emb.weight
    assert untied.num_params() - model.num_params() == VOCAB * 64


@pytest.mark.parametrize("preset, expected", [("bert-base", 109.5e6), ("bert-large", 335e6)])
def test_bert_preset_param_counts_match_public_models(preset, expected):
    n = count_params(resolve_model_spec(model_cfg(preset, arch="encoder"), vocab_size=30522))
    assert abs(n - expected) / expected < 0.03
    if preset == "bert-base":
        assert n == 109_512_762  # HF BertForMaskedLM: 109_514_298 (+ token types, embedding norm)
        assert abs(n - 110e6) / 110e6 < 0.01


@pytest.mark.parametrize("arch, overrides", [
    ("encoder", {}),
    ("encoder", dict(tie_embeddings=False)),
    ("encoder", dict(bias=False, norm="rmsnorm", position="rope", mlp="swiglu", n_kv_heads=2)),
    ("encoder", dict(dropout=0.1)),
    ("encoder", BERT_OPTIONS),
    ("encoder", dict(BERT_OPTIONS, norm_position="pre", bias=False)),
    ("decoder", {}),
    ("decoder", dict(norm_position="post", type_vocab_size=1)),
    ("decoder", dict(LLAMA_STYLE, n_kv_heads=2, tie_embeddings=False)),
])
@pytest.mark.parametrize("head", ["lm", "classify"])
def test_count_params_matches_built_model_for_every_arch_and_head(arch, overrides, head):
    model = build(arch=arch, head=head, num_labels=3 if head == "classify" else None, **overrides)
    assert count_params(model.spec) == model.num_params()


def test_flops_per_token_of_encoder_and_classify_heads_match_hand_formula():
    L, d, ff, T, K = 2, 64, 256, 128, 3
    trunk = L * (d * 3 * d + d * d + d * ff + ff * d)
    attention = 12 * L * d * T
    mlm = build(arch="encoder")
    assert mlm.flops_per_token(T) == 6 * (trunk + d * d + d * VOCAB) + attention == spec_flops_per_token(mlm.spec, T)
    for arch in ARCH_NAMES:
        classify = build(arch=arch, head="classify", num_labels=K)
        assert classify.flops_per_token(T) == 6 * (trunk + d * K) + attention


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_classify_head_gives_one_row_of_logits_per_sequence(arch):
    model = build(arch=arch, head="classify", num_labels=5)
    lengths = torch.tensor([7, 3])
    logits = model(tokens(B=2, T=7), attn_mask=key_padding(lengths.tolist(), 7), lengths=lengths)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32 and logits.isfinite().all()
    assert not hasattr(model, "lm_head") and not hasattr(model, "mlm_head")
    assert model.classifier_dropout is None  # debug has dropout 0
    dropped = build(arch=arch, head="classify", num_labels=5, dropout=0.1)
    assert isinstance(dropped.classifier_dropout, torch.nn.Dropout)


@pytest.mark.parametrize("arch, pooling", [("decoder", "auto"), ("encoder", "last")])
def test_last_pooling_reads_the_last_real_token_and_ignores_padding(arch, pooling):
    model = build(arch=arch, head="classify", num_labels=4, pooling=pooling)
    assert model.spec.pooling == "last"
    lengths, T = [9, 4, 6], 9
    ids, mask = tokens(B=3, T=T), key_padding(lengths, T)
    hidden = {}
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: hidden.update(h=out))
    with torch.no_grad():
        logits = model(fill_padding(ids, lengths, 0), attn_mask=mask, lengths=torch.tensor(lengths))
        last = hidden["h"][torch.arange(3), torch.tensor(lengths) - 1]  # (B, C)
        torch.testing.assert_close(logits, model.classifier(model.norm(last)))
        other_padding = model(fill_padding(ids, lengths, 7), attn_mask=mask, lengths=torch.tensor(lengths))
        torch.testing.assert_close(logits, other_padding)
        if arch == "decoder":  # causal: the padding needs no mask at all
            torch.testing.assert_close(logits, model(fill_padding(ids, lengths, 7), lengths=torch.tensor(lengths)))
    with pytest.raises(ValueError, match="lengths"):
        model(ids)


def test_encoder_pools_the_first_token_by_default():
    model = build(arch="encoder", head="classify", num_labels=4)
    assert model.spec.pooling == "first"
    ids = tokens(B=2, T=8)
    hidden = {}
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: hidden.update(h=out))
    with torch.no_grad():
        logits = model(ids)  # lengths not needed
        torch.testing.assert_close(logits, model.classifier(model.norm(hidden["h"][:, 0])))
        changed = ids.clone()
        changed[:, -1] = (ids[:, -1] + 1) % VOCAB
        assert not torch.allclose(model(changed), logits)  # the first token sees the whole sequence


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_trunk_state_dict_keys_are_the_same_for_both_heads_so_lm_weights_load(arch):
    lm = build(arch=arch, seed=1)
    classify = build(arch=arch, seed=2, head="classify", num_labels=3)

    def trunk(keys):
        return {k for k in keys if not k.startswith(HEAD_KEYS)}

    assert trunk(lm.state_dict()) == trunk(classify.state_dict())
    assert {"tok_emb.weight", "norm.weight", "blocks.1.attn.qkv.weight"} <= trunk(classify.state_dict())
    assert not any(k.startswith(("lm_head", "mlm_head")) for k in classify.state_dict())
    result = classify.load_state_dict(lm.state_dict(), strict=False)
    assert set(result.missing_keys) == {"classifier.weight", "classifier.bias"}
    assert result.unexpected_keys and all(k.startswith(("lm_head", "mlm_head")) for k in result.unexpected_keys)
    torch.testing.assert_close(classify.blocks[0].attn.qkv.weight, lm.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("head", ["lm", "classify"])
def test_every_parameter_gets_a_gradient_through_forward(arch, head):
    """DDP needs no find_unused_parameters: nothing is built that forward does not use."""
    model = build(arch=arch, head=head, num_labels=2 if head == "classify" else None)
    lengths = torch.tensor([8, 5])
    out = model(tokens(T=8), attn_mask=key_padding([8, 5], 8), lengths=lengths)
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("preset, arch, wanted", [
    ("bert-base", "decoder", "encoder"),
    ("bert-tiny", "decoder", "encoder"),
    ("gpt2-124m", "encoder", "decoder"),
    ("llama-1b", "encoder", "decoder"),
])
def test_preset_of_the_other_arch_raises_user_error_naming_preset(preset, arch, wanted):
    with pytest.raises(UserError) as err:
        resolve_model_spec(model_cfg(preset, arch=arch))
    message = str(err.value)
    assert message.startswith(f"model.preset: preset '{preset}' is a")
    assert f"set model.arch: {wanted}" in message and "\n" not in message
    if preset == "bert-base":
        assert message.startswith("model.preset: preset 'bert-base' is an encoder preset — set model.arch: encoder")


def test_unknown_arch_is_checked_before_the_preset():
    with pytest.raises(UserError, match="^model.arch: unknown arch 'bert' — choose one of decoder, encoder$"):
        resolve_model_spec(model_cfg("bert-base", arch="bert"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head="classify", num_labels=2, pooling="first"), UserError, "^task.pooling: 'first'"),
    (dict(head="classify", num_labels=2, pooling="mean"), UserError, "^task.pooling: unknown pooling 'mean'"),
    (dict(head="classify"), ValueError, "num_labels"),
    (dict(head="lm", num_labels=2), ValueError, "num_labels"),
    (dict(head="seq2seq"), ValueError, "head"),
])
def test_bad_head_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_model(model_cfg(), VOCAB, **kwargs)


@pytest.mark.parametrize("head", ["lm", "classify"])
def test_meta_build_then_to_empty_and_init_weights_works_for_the_encoder(head):
    torch.manual_seed(0)
    model = build_model(model_cfg(arch="encoder"), VOCAB, device="meta", head=head,
                        num_labels=3 if head == "classify" else None)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    if head == "lm":
        assert model.mlm_head.proj.weight is model.tok_emb.weight  # tie survives to_empty
        assert torch.all(model.mlm_head.proj.bias == 0) and torch.all(model.mlm_head.norm.weight == 1)
    eager = build(arch="encoder", head=head, num_labels=3 if head == "classify" else None)
    torch.manual_seed(1)
    eager.init_weights()
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name  # init_weights alone decides the weights, on any device
    assert model.eval()(tokens()).isfinite().all()


def test_encoder_bf16_autocast_forward_on_cpu():
    model = build(arch="encoder")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens(), attn_mask=key_padding([16, 9], 16))
    assert logits.dtype == torch.bfloat16 and logits.float().isfinite().all()


# --------------------------------------------------------------------------- options Hugging Face families need

HF_OPTIONS = [
    dict(LLAMA_STYLE, n_kv_heads=2, qkv_bias=True),  # Qwen2: q/k/v biases only
    dict(LLAMA_STYLE, n_kv_heads=2, qk_norm=True, d_head=24),  # Qwen3: q/k norm, head_dim != d_model / n_heads
    dict(qk_norm=True, tie_embeddings=False),  # a layernorm q/k norm (with biases)
    dict(gelu_approximate="none", bias=False, qkv_bias=True),
    dict(LLAMA_STYLE, rope_scaling=(8.0, 1.0, 4.0, 32)),
]


@pytest.mark.parametrize("overrides", HF_OPTIONS)
def test_count_params_and_flops_match_built_model_with_hf_options(overrides):
    model = build(**overrides)
    assert count_params(model.spec) == model.num_params()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    T, spec = 32, model.spec
    assert model.flops_per_token(T) == 6 * matmul + 12 * spec.n_layers * spec.d_model * T
    assert model(tokens(T=T)).shape == (2, T, VOCAB)


def test_hf_options_default_to_the_older_models():
    spec = resolve_model_spec(model_cfg(bias=False), VOCAB)
    assert (spec.d_head, spec.qkv_bias, spec.qk_norm, spec.rope_scaling, spec.gelu_approximate) == (
        None, False, False, None, "tanh")
    assert spec.head_dim == 16
    model = build(**STYLES["llama"])
    assert model.blocks[0].attn.q_norm is None and model.blocks[0].attn.rope.scaling is None


def test_qkv_bias_alone_and_d_head_shape_the_attention():
    attn = build(**dict(LLAMA_STYLE, n_kv_heads=2, qkv_bias=True, d_head=24)).blocks[0].attn
    assert attn.qkv.bias is not None and attn.out_proj.bias is None
    assert tuple(attn.qkv.weight.shape) == ((4 + 2 * 2) * 24, 64) and tuple(attn.out_proj.weight.shape) == (64, 96)


def test_exact_gelu_differs_from_the_tanh_approximation():
    ids = tokens()
    with torch.no_grad():
        assert not torch.equal(build()(ids), build(gelu_approximate="none")(ids))


@pytest.mark.parametrize("overrides, key", [
    (dict(d_head=0), "model.d_head"),
    (dict(rope_scaling=(8.0, 1.0, 4.0, 32)), "model.rope_scaling"),  # learned positions
    (dict(LLAMA_STYLE, rope_scaling=(8.0, 4.0, 1.0, 32)), "model.rope_scaling"),  # low >= high
    (dict(gelu_approximate="erf"), "model.gelu_approximate"),
])
def test_bad_hf_option_raises_user_error_naming_key(overrides, key):
    with pytest.raises(UserError) as err:
        resolve_model_spec(model_cfg(**overrides))
    assert str(err.value).startswith(key + ":") and "\n" not in str(err.value)


def test_bert_options_default_off_and_leave_the_default_models_as_they_were():
    for arch in ARCH_NAMES:
        spec = build(arch=arch).spec
        assert (spec.norm_position, spec.embedding_norm, spec.type_vocab_size, spec.position_offset, spec.pooler) == \
            ("pre", False, 0, 0, False)
        keys = set(build(arch=arch, head="classify", num_labels=2).state_dict())
        assert not any(k.startswith(("type_emb", "emb_norm", "pooler")) for k in keys) and "norm.weight" in keys


def test_post_norm_encoder_is_bert_shaped_and_its_pooler_counts_in_flops():
    L, d, ff, T, K = 2, 64, 256, 128, 3
    model = build(arch="encoder", head="classify", num_labels=K, **BERT_OPTIONS)
    keys = set(model.state_dict())
    assert {"type_emb.weight", "emb_norm.weight", "pooler.weight", "pooler.bias"} <= keys and "norm.weight" not in keys
    assert model.pos_emb.weight.shape == (model.spec.max_seq_len + 2, d)  # rows from position_offset
    trunk = L * (d * 3 * d + d * d + d * ff + ff * d)
    assert model.flops_per_token(T) == 6 * (trunk + d * K + d * d) + 12 * L * d * T
    block = model.blocks[0]  # post-norm: norm(x + attn(x)), then norm(x + mlp(x))
    x = torch.randn(2, 8, d)
    with torch.no_grad():
        h = block.attn_norm(x + block.attn(x))
        torch.testing.assert_close(block(x), block.mlp_norm(h + block.mlp(h)))
    out = model(tokens(T=8), attn_mask=key_padding([8, 5], 8))
    assert out.shape == (2, K) and out.abs().max() <= model.classifier.weight.abs().sum(1).max() + model.classifier.bias.abs().max()


def test_init_rows_of_any_range_equal_the_same_rows_of_the_full_draw():
    """normal_rows draws each block of rows from its own generator, so a shard (FSDP's row range, the rows
    under a ZeRO-3 flat slice) draws only its rows and still gets the values of the unsharded tensor."""
    from bigtrain.models.layers import ROW_BLOCK_ELEMENTS, normal_rows

    shape = (3 * ROW_BLOCK_ELEMENTS // 256 + 5, 256)  # three full blocks and a partial one
    full = normal_rows(shape, 0.02, seed=7, first=0, stop=shape[0])
    assert full.shape == shape and abs(full.std().item() - 0.02) < 1e-3
    for first, stop in ((0, 1), (4095, 4097), (100, shape[0]), (shape[0] - 1, shape[0])):
        assert torch.equal(normal_rows(shape, 0.02, seed=7, first=first, stop=stop), full[first:stop])
    assert not torch.equal(normal_rows(shape, 0.02, seed=8, first=0, stop=4), full[:4])
