"""Tests for bigtrain/eval/generate.py: greedy output equal to transformers' generate token for token (tiny random
GPT-2 and Llama with GQA and llama3 RoPE, KV cache on and off), batched equal to unbatched, seeded sampling,
stop strings and streaming, the chat template, and `bigtrain generate` itself (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from bigtrain.cli import main  # noqa: E402
from bigtrain.config import Config, DataConfig, ModelConfig  # noqa: E402
from bigtrain.eval.generate import Completion, SamplingConfig, encode_prompts, generate_ids, pick_next  # noqa: E402
from bigtrain.eval.generator import load_generator  # noqa: E402
from bigtrain.interop.hf_config import with_hf_model  # noqa: E402
from tests.unit.test_interop import bigtrain_model, bpe, checkpoint_of, hf_folder  # noqa: E402, F401

FAMILIES = ("gpt2", "llama-gqa-untied-llama3-rope")
NEW = 24
CHAT_TEMPLATE = ("{% for m in messages %}<|sep|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|sep|>assistant\n{% endif %}")


def prompt_ids(n: int, seed: int) -> list[int]:
    """n random ids clear of the special ones (0..4), so no prompt holds an EOS."""
    return torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    return {family: hf_folder(tmp, family, tokenizer=bpe) for family in FAMILIES}


@pytest.fixture(scope="module")
def generators(folders):
    return {family: load_generator(folder) for family, folder in folders.items()}


@pytest.fixture(scope="module")
def transformers_greedy(folders) -> dict[str, list[int]]:
    """transformers' own greedy continuation of prompt_ids(12, 3), per family."""
    out = {}
    for family, folder in folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        prompt = prompt_ids(12, 3)
        out[family] = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)[0, 12:].tolist()
    return out


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(generators, transformers_greedy, family, use_cache):
    gen = generators[family]
    ours = generate_ids(gen.model, [prompt_ids(12, 3)], SamplingConfig(max_new_tokens=NEW), eos_ids=gen.eos_ids,
                        use_cache=use_cache)[0]
    assert ours == transformers_greedy[family]
    assert len(ours) == NEW or ours[-1] in gen.eos_ids  # the full length, or stopped where transformers did


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_unbatched(generators, family, use_cache):
    """Prompts of different lengths, left-padded into one batch: each row as the prompt alone."""
    gen = generators[family]
    prompts = [prompt_ids(n, seed) for n, seed in ((5, 10), (13, 11), (9, 12))]
    sampling = SamplingConfig(max_new_tokens=16)
    batched = generate_ids(gen.model, prompts, sampling, eos_ids=gen.eos_ids, use_cache=use_cache)
    alone = [generate_ids(gen.model, [p], sampling, eos_ids=gen.eos_ids, use_cache=use_cache)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(row) for row in batched}) == 3


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(generators):
    gen = generators["llama-gqa-untied-llama3-rope"]
    prompts = [prompt_ids(6, 20), prompt_ids(9, 21)]

    def sample(seed: int, **kw) -> list[list[int]]:
        sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=seed, **kw)
        return generate_ids(gen.model, prompts, sampling, eos_ids=gen.eos_ids)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, top_k=40, top_p=0.9) == sample(1, top_k=40, top_p=0.9)
    greedy = generate_ids(gen.model, prompts, SamplingConfig(max_new_tokens=16), eos_ids=gen.eos_ids)
    assert sample(1) != greedy and sample(3, top_k=1) == greedy  # top-k 1 is greedy whatever the seed


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).log_softmax(-1).repeat(4000, 1)  # (B, V)
    generator = torch.Generator().manual_seed(0)
    seen = set(pick_next(logits, SamplingConfig(temperature=1.0, top_k=2), generator).tolist())
    assert seen == {1, 2}
    # p(1) ~ 0.64, p(2) ~ 0.23: top_p 0.8 keeps exactly those two
    seen = set(pick_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), generator).tolist())
    assert seen == {1, 2}
    assert set(pick_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), generator).tolist()) == {1}


def test_stop_string_is_cut_and_never_streamed(bpe):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(bpe))
    completion = Completion(tok, ("return x",), eos_ids=(0,))
    streamed = "".join(completion.add(i) for i in tok.encode("    y = 2\n    return x + y").ids)
    assert completion.finished and completion.text == "    y = 2\n    " and streamed + completion.rest() == completion.text
    eos = Completion(tok, (), eos_ids=(0,))
    streamed = "".join(eos.add(i) for i in [*tok.encode("a = 1").ids, 0, *tok.encode("b").ids])
    assert eos.finished and streamed + eos.rest() == "a = 1"  # nothing after the EOS


def test_a_bigtrain_checkpoint_generates_what_its_hf_folder_does(tmp_path, folders, generators, bpe):
    folder = folders["llama-gqa-untied-llama3-rope"]
    cfg = with_hf_model(Config(model=ModelConfig(init_from=str(folder)), data=DataConfig(seq_len=32)))
    ckpt = checkpoint_of(tmp_path, bigtrain_model(folder), cfg, bpe)
    from_run_dir = load_generator(ckpt.parent.parent)
    assert from_run_dir.folder == ckpt and from_run_dir.vocab_limit is None  # the model's own vocab, not padded
    sampling = SamplingConfig(max_new_tokens=16)
    assert (generate_ids(from_run_dir.model, [prompt_ids(12, 3)], sampling, eos_ids=from_run_dir.eos_ids)
            == generate_ids(generators["llama-gqa-untied-llama3-rope"].model, [prompt_ids(12, 3)], sampling,
                            eos_ids=(0,)))


def test_padding_rows_of_a_bigtrain_vocab_are_never_generated(tmp_path, bpe):
    """A bigtrain-trained model's embedding is the tokenizer's 300 tokens padded to 320: ids >= 300 never come out."""
    from bigtrain.models import build_model

    cfg = Config(model=ModelConfig(preset="debug", max_seq_len=64))
    torch.manual_seed(0)
    model = build_model(cfg.model, 320)
    with torch.no_grad():
        model.lm_head.weight[300:] *= 50  # make the padding rows the likeliest
    gen = load_generator(checkpoint_of(tmp_path, model, cfg, bpe))
    assert gen.vocab_limit == 300 and gen.eos_ids == (0,)
    ids = generate_ids(gen.model, [prompt_ids(8, 1)], SamplingConfig(max_new_tokens=16, temperature=2.0, seed=0),
                       eos_ids=gen.eos_ids, vocab_limit=gen.vocab_limit)[0]
    assert ids and max(ids) < 300


def test_chat_prompt_equals_transformers_apply_chat_template(tmp_path, folders):
    folder = tmp_path / "chat"
    folder.mkdir()
    for f in folders["gpt2"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
    ours = encode_prompts(load_generator(folder), ["def f(x):"], chat=True)[0]
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "def f(x):"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(theirs)


# --------------------------------------------------------------------------- the command


def test_cli_generate_streams_the_greedy_completion(folders, generators, capsys, tmp_path):
    gen = generators["gpt2"]
    assert main(["generate", str(folders["gpt2"]), "--prompt", "def f(x):", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    ids = generate_ids(gen.model, [gen.tokenizer.encode("def f(x):").ids], SamplingConfig(max_new_tokens=12),
                       eos_ids=gen.eos_ids)[0]
    assert out == gen.tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err and "KV cache" in err

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"def f(x):"\n{"prompt": "import os"}\n')
    assert main(["generate", str(folders["gpt2"]), "--prompts", str(prompts), "--max-new-tokens", "12",
                 "--no-cache"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["def f(x):", "import os"] and lines[0]["completion"] == out[:-1]


@pytest.mark.parametrize("argv,what", [
    (["generate", "{tmp}", "--prompt", "x"], "is not a run dir, checkpoint or Hugging Face folder"),
    (["generate", "{tmp}/missing", "--prompt", "x"], "no such run dir, checkpoint or Hugging Face folder"),
    (["generate", "{gpt2}", "--prompt", "x", "--chat"], "has no chat template"),
    (["generate", "{gpt2}", "--prompt", "x", "--top-k", "5"], "--temperature above 0"),
])
def test_bad_input_is_one_line_exit_2(folders, tmp_path, capsys, argv, what):
    argv = [a.format(tmp=tmp_path, gpt2=folders["gpt2"]) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("bigtrain: error:") and what in err and out == ""
