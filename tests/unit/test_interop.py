"""Tests for bigtrain/interop/: Hugging Face decoders in (model.init_from) and out (export --format hf),
with exact numerics against transformers' own model code on tiny random models (fp32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from bigtrain.checkpoint import TrainState, load_init_weights, save  # noqa: E402
from bigtrain.cli import main  # noqa: E402
from bigtrain.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, dump_yaml  # noqa: E402
from bigtrain.checkpoint.export import export_hf  # noqa: E402
from bigtrain.interop.hf_config import with_hf_model  # noqa: E402
from bigtrain.models import build_model  # noqa: E402
from bigtrain.train.optim import build_optimizer  # noqa: E402
from bigtrain.parallel import build_engine, init_distributed  # noqa: E402
from tests.conftest import put_in_hub_cache, run_cli, tiny_recipe, write_recipe  # noqa: E402

VOCAB = 320
TOL = 1e-4
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (config class, kwargs): every family, with the variants the brief names.
FAMILIES = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                eos_token_id=0)),
    "gpt2-exact-gelu-untied": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                  bos_token_id=0, eos_token_id=0,
                                                  activation_function="gelu", tie_word_embeddings=False,
                                                  layer_norm_epsilon=1e-6)),
    "llama-gqa-untied-llama3-rope": ("LlamaConfig", dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2,
                                                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                                                         rope_parameters=LLAMA3_ROPE)),
    "llama-tied-biases": ("LlamaConfig", dict(SMALL, vocab_size=VOCAB, tie_word_embeddings=True, attention_bias=True,
                                              mlp_bias=True, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 500000.0})),
    "mistral-head-dim": ("MistralConfig", dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, head_dim=32,
                                               sliding_window=None)),
    "qwen2-tied": ("Qwen2Config", dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-head-dim": ("Qwen3Config", dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, head_dim=32,
                                           tie_word_embeddings=False)),
}


def hf_folder(tmp_path: Path, family: str, *, dtype: torch.dtype = torch.float32, tokenizer: Path | None = None,
              seed: int = 0) -> Path:
    """A tiny random HF model of `family`, saved with save_pretrained; every weight perturbed, so norms
    and biases are not their trivial init (a mapping that drops one shows)."""
    cls, kwargs = FAMILIES[family]
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / family
    model.to(dtype).save_pretrained(folder)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def bigtrain_model(folder: Path, seq_len: int = 32, **model_keys) -> torch.nn.Module:
    """A bigtrain model built from the HF folder's config.json with its weights, through the init_from path."""
    cfg = with_hf_model(Config(model=ModelConfig(init_from=str(folder), **model_keys), data=DataConfig(seq_len=seq_len)))
    model = build_model(cfg.model, cfg.model.vocab_size)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report, weights = load_init_weights(folder, expected, arch="decoder")
    assert report["new"] == [] and report["unused"] == []
    model.load_state_dict(weights, strict=True)
    return model.eval()


def ids(B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def max_diff(ours: torch.nn.Module, folder: Path, tokens: torch.Tensor) -> float:
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return (ours(tokens).float() - theirs(tokens).logits.float()).abs().max().item()


def checkpoint_of(tmp_path: Path, model: torch.nn.Module, cfg: Config, tokenizer: Path | None = None) -> Path:
    """A real single-process bigtrain checkpoint of `model` (config.yaml = cfg)."""
    dist = init_distributed("cpu")
    engine = build_engine(ParallelConfig(precision="fp32"), model,
                          lambda m: build_optimizer(OptimConfig(lr=1e-3), m, dist.device), dist)
    extra = {"tokenizer.json": tokenizer} if tokenizer is not None else {}
    return save(tmp_path / "run", TrainState(step=1), engine, dist, config_yaml=dump_yaml(cfg), keep_last=0,
                extra_files=extra)


def train_bpe_file(folder: Path) -> Path:
    """FOLDER/tokenizer.json: a byte-level BPE (< VOCAB tokens) with bigtrain's EOS and pad tokens."""
    import textwrap

    from bigtrain.data.tokenizer import train_bpe

    text = Path(textwrap.__file__).read_text().splitlines()
    tok = train_bpe(iter([text]), 300)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (< VOCAB tokens) with bigtrain's EOS and pad tokens."""
    return train_bpe_file(tmp_path_factory.mktemp("tok"))


# --------------------------------------------------------------------------- import parity


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits(tmp_path, family):
    folder = hf_folder(tmp_path, family)
    diff = max_diff(bigtrain_model(folder), folder, ids())
    print(f"{family}: max |logits bigtrain - transformers| = {diff:.2e}")
    assert diff <= TOL


def test_rope_is_hf_rotate_half_layout_and_llama3_scaling_matches():
    """Our RoPE (plain and llama3-scaled) equals transformers' apply_rotary_pos_emb with its own tables."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from bigtrain.models.layers import RotaryEmbedding

    for rope, scaling in (({"rope_type": "default", "rope_theta": 10000.0}, None),
                          (LLAMA3_ROPE, (8.0, 1.0, 4.0, 16))):
        config = transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope))
        x = torch.randn(2, 4, 20, 16)  # (B, H, T, hd)
        position_ids = torch.arange(20)[None]
        cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
        theirs, _ = apply_rotary_pos_emb(x, x, cos, sin)
        ours = RotaryEmbedding(16, 64, 10000.0, scaling)(x)
        assert (ours - theirs).abs().max().item() <= 1e-5
        if scaling is not None:  # and the scaling really changes the rotation
            assert (ours - RotaryEmbedding(16, 64, 10000.0)(x)).abs().max().item() > 0.1


def test_import_of_a_bf16_sharded_folder_and_a_pytorch_bin(tmp_path):
    folder = hf_folder(tmp_path, "qwen2-tied", dtype=torch.bfloat16)
    reference = bigtrain_model(folder).state_dict()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = bigtrain_model(tmp_path / "sharded").state_dict()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = bigtrain_model(tmp_path / "bin").state_dict()
    for name, tensor in reference.items():
        assert torch.equal(sharded[name], tensor) and torch.equal(from_bin[name], tensor), name


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("family,dtype", [("gpt2", "fp32"), ("llama-gqa-untied-llama3-rope", "fp32"),
                                          ("llama-tied-biases", "fp32"), ("qwen2-tied", "bf16"),
                                          ("qwen3-head-dim", "fp32")])
def test_round_trip_hf_bigtrain_hf_is_bit_identical(tmp_path, family, dtype):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    folder = hf_folder(tmp_path, family, dtype=torch_dtype)
    cfg = with_hf_model(Config(model=ModelConfig(init_from=str(folder)), data=DataConfig(seq_len=32)))
    out = export_hf(checkpoint_of(tmp_path, bigtrain_model(folder), cfg), tmp_path / "out", dtype=dtype)
    source, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(exported) == set(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((folder / "config.json").read_text())["architectures"]
    assert config["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]


LLAMA_STYLE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, n_kv_heads=2, rope_theta=500000.0)


@pytest.mark.parametrize("name,keys,architecture", [
    ("gpt2-style", {}, "GPT2LMHeadModel"),
    ("llama-style", dict(LLAMA_STYLE, tie_embeddings=False, rope_scaling=(8.0, 1.0, 4.0, 16)), "LlamaForCausalLM"),
    ("qwen2-style", dict(LLAMA_STYLE, qkv_bias=True), "Qwen2ForCausalLM"),
    ("qwen3-style", dict(LLAMA_STYLE, qk_norm=True, d_head=32), "Qwen3ForCausalLM"),
])
def test_bigtrain_decoder_exports_to_transformers_with_the_same_logits(tmp_path, bpe, name, keys, architecture):
    cfg = Config(model=ModelConfig(preset="debug", max_seq_len=64, **keys))
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB)
    with torch.no_grad():  # away from the init (unit norms, zero biases), so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_hf(checkpoint_of(tmp_path, model, cfg, bpe), tmp_path / "hf", max_shard_bytes=60_000)
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert (out / "model.safetensors.index.json").is_file()  # sharded above the limit
    diff = max_diff(model.eval(), out, ids())
    print(f"{name}: max |logits bigtrain - transformers| after export = {diff:.2e}")
    assert diff <= TOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    import tokenizers

    assert tokenizer("def f(x): return x")["input_ids"] == tokenizers.Tokenizer.from_file(str(bpe)).encode(
        "def f(x): return x").ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"


@pytest.mark.parametrize("keys,what", [
    (dict(arch="encoder"), "model.arch=encoder"),
    (dict(position="rope"), "norm=layernorm with position=rope"),
    (dict(norm="layernorm", position="rope", mlp="swiglu", bias=False), "norm=layernorm with position=rope and mlp=swiglu"),
    (dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=True, qkv_bias=False), "bias=true with qkv_bias=false"),
])
def test_export_of_a_model_no_hf_class_expresses_is_one_line_exit_2(tmp_path, capsys, keys, what):
    cfg = Config(model=ModelConfig(preset="debug", **keys))
    folder = checkpoint_of(tmp_path, build_model(cfg.model, VOCAB), cfg)
    assert main(["export", str(folder), str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and what in err and "no exact Hugging Face class" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------- bad input


def recipe_for(tmp_path, cache_dir, **model) -> Path:
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", model=model))


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # what building the folder printed
    assert main(argv) == 2
    err = capsys.readouterr().err  # data preparation may log first; the error is one line, no traceback
    errors = [line for line in err.splitlines() if line.startswith("bigtrain: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err
    return errors[0]


def test_folder_without_config_json_is_one_line_exit_2(tmp_path, cache_dir, capsys):
    folder = hf_folder(tmp_path, "gpt2")
    (folder / "config.json").unlink()
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"])
    assert "no config.json" in err


def test_unsupported_architecture_is_one_line_exit_2(tmp_path, cache_dir, capsys):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertLMHeadModel"], "vocab_size": 30}))
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"])
    assert "['BertLMHeadModel']" in err and "LlamaForCausalLM" in err


def test_contradicting_recipe_key_names_both_values(tmp_path, cache_dir, capsys):
    folder = hf_folder(tmp_path, "llama-gqa-untied-llama3-rope")
    recipe = recipe_for(tmp_path, cache_dir)
    err = one_line_error(capsys, ["train", str(recipe), f"model.init_from={folder}", "model.n_kv_heads=4"])
    assert "model.n_kv_heads=4" in err and "n_kv_heads=2" in err
    err = one_line_error(capsys, ["train", str(recipe), f"model.init_from={folder}", "model.preset=llama-1b"])
    assert "model.preset=llama-1b" in err and "config.json" in err


def test_folder_without_tokenizer_needs_data_tokenizer(tmp_path, cache_dir, capsys):
    folder = hf_folder(tmp_path, "qwen2-tied")
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"])
    assert "tokenizer.json" in err and "data.tokenizer" in err


def test_mistral_sliding_window_shorter_than_seq_len_is_one_line_exit_2(tmp_path, cache_dir, capsys, bpe):
    cls, kwargs = FAMILIES["mistral-head-dim"]
    FAMILIES["mistral-window"] = (cls, dict(kwargs, sliding_window=16))
    try:
        folder = hf_folder(tmp_path, "mistral-window", tokenizer=bpe)
    finally:
        del FAMILIES["mistral-window"]
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"])
    assert "sliding_window=16" in err and "data.seq_len=32" in err


def test_weights_of_another_shape_are_one_line_exit_2(tmp_path, cache_dir, capsys, bpe):
    folder = hf_folder(tmp_path, "gpt2", tokenizer=bpe)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 32, "n_inner": 64}))
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"])
    assert "tok_emb.weight" in err and "(320, 64)" in err and "(320, 32)" in err


def test_init_from_reads_each_tensor_when_the_engine_copies_it(tmp_path, monkeypatch):
    """Each tensor is read from the folder when the engine copies it, and dropped before the next read:
    a rank holds at most one full tensor beside its model."""
    import weakref

    from bigtrain.interop import hf_weights

    folder = hf_folder(tmp_path, "llama-gqa-untied-llama3-rope")
    alive, most_alive = [], [0]

    class Counting:  # the folder's real reader, counting the tensors it handed out that are still alive
        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def get(self, name):
            most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in alive))
            tensor = self.reader.get(name)
            alive.append(weakref.ref(tensor))
            return tensor

    real_open = hf_weights.open_hf_weights
    monkeypatch.setattr(hf_weights, "open_hf_weights", lambda f, *a, **k: Counting(real_open(f, *a, **k)))
    cfg = with_hf_model(Config(model=ModelConfig(init_from=str(folder)), data=DataConfig(seq_len=32)))
    model = build_model(cfg.model, cfg.model.vocab_size)
    dist = init_distributed("cpu")
    engine = build_engine(ParallelConfig(precision="fp32"), model,
                          lambda m: build_optimizer(OptimConfig(lr=1e-3), m, dist.device), dist)
    report, weights = load_init_weights(folder, {k: tuple(t.shape) for k, t in model.state_dict().items()},
                                        arch="decoder")
    engine.load_model_weights(weights)
    assert len(alive) == len(report["loaded"]) == len(model.state_dict()) and most_alive[0] == 0
    assert max_diff(engine.module.eval(), folder, ids()) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied-llama3-rope", "qwen3-head-dim"])
def test_check_counts_the_imported_models_parameters(tmp_path, cache_dir, capsys, family):
    folder = hf_folder(tmp_path, family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    capsys.readouterr()
    assert main(["check", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("parameters"))
    assert int(line.split()[1].replace(",", "")) == hf.num_parameters()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache with the hub unreachable (what HF_HUB_OFFLINE=1 HF_HUB_CACHE=... give a new process)."""
    import huggingface_hub.constants

    from bigtrain.interop import hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub._snapshot.cache_clear()
    yield cache
    hub._snapshot.cache_clear()


def test_hub_id_resolves_through_the_cache_at_the_pinned_revision(tmp_path, cache_dir, capsys, offline_hub):
    main_rev = put_in_hub_cache(offline_hub, "bigtrain-test/tiny", hf_folder(tmp_path, "qwen3-head-dim"))
    v1 = put_in_hub_cache(offline_hub, "bigtrain-test/tiny", hf_folder(tmp_path, "gpt2"), revision="v1")
    recipe = recipe_for(tmp_path, cache_dir)
    for folder, revision in ((main_rev, []), (v1, ["model.init_revision=v1"])):
        capsys.readouterr()
        assert main(["check", str(recipe), "model.init_from=bigtrain-test/tiny", *revision]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("parameters"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert int(line.split()[1].replace(",", "")) == hf.num_parameters()


def test_hub_id_not_in_the_cache_checks_offline_and_train_is_one_line_exit_2(tmp_path, cache_dir, capsys, offline_hub):
    recipe = recipe_for(tmp_path, cache_dir)
    capsys.readouterr()
    assert main(["check", str(recipe), "model.init_from=meta-llama/Llama-3.2-1B"]) == 0
    out = capsys.readouterr().out
    assert "model        meta-llama/Llama-3.2-1B: a Hugging Face hub id not in the local cache" in out
    err = one_line_error(capsys, ["train", str(recipe), "model.init_from=meta-llama/Llama-3.2-1B"])
    assert "'meta-llama/Llama-3.2-1B' is no local folder and is not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1" in err


# --------------------------------------------------------------------------- end to end, through the CLI


def test_cli_train_from_hf_folder_then_export_hf_loads_in_transformers(tmp_path, cache_dir, bpe):
    """Starts processes: `bigtrain train` with model.init_from=HF folder, then `bigtrain export --format hf`."""
    folder = hf_folder(tmp_path, "llama-gqa-untied-llama3-rope", tokenizer=bpe)
    recipe = write_recipe(tmp_path / "ft.yaml", tiny_recipe(cache_dir, tmp_path / "runs", model={},
                                                            train={"max_steps": 3}))
    result = run_cli("train", str(recipe), f"model.init_from={folder}", "run.name=ft")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "ft"
    out = tmp_path / "exported"
    result = run_cli("export", str(run_dir), str(out), "--format", "hf", "--max-shard-size", "100KB")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors.index.json").is_file()

    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.checkpoint import open_weights

    reader = open_weights(list_checkpoints(run_dir)[-1])
    trained = {name: reader.get(name) for name in reader.tensors()}
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"],
                           bigtrain_model(folder).state_dict()["blocks.0.attn.qkv.weight"])  # it trained
    model = bigtrain_model(folder)
    model.load_state_dict(trained, strict=True)
    diff = max_diff(model, out, ids())
    print(f"fine-tuned llama → export: max |logits bigtrain - transformers| = {diff:.2e}")
    assert diff <= TOL
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
