"""Tests for bigtrain/models/: presets, spec resolution, Decoder behaviour, counts and init."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bigtrain.errors import UserError
from bigtrain.models import (
    ARCHS, PRESETS, Decoder, build_model, count_params, resolve_model_spec, spec_flops_per_token,
)
from bigtrain.models.presets import SPEC_FIELDS

VOCAB = 97
LLAMA_STYLE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)


def model_cfg(preset: str = "debug", arch: str = "decoder", **overrides) -> SimpleNamespace:
    """Stand-in for config.ModelConfig: every override None unless given."""
    fields = {name: None for name in SPEC_FIELDS}
    fields.update(overrides)
    return SimpleNamespace(arch=arch, preset=preset, **fields)


def build(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return build_model(model_cfg(**overrides), VOCAB).eval()


def tokens(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


STYLES = {"gpt2": {}, "llama": dict(LLAMA_STYLE, n_kv_heads=2)}


def test_presets_fill_every_field_and_registry_has_decoder():
    assert set(PRESETS) == {"debug", "gpt2-124m", "gpt2-355m", "llama-1b", "llama-8b"}
    for values in PRESETS.values():
        assert set(values) == set(SPEC_FIELDS)
    assert ARCHS["decoder"] is Decoder


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
