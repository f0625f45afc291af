"""Fine-tune an imported Hugging Face model the way a user would: a tiny random Llama with a ChatML chat
template, in the hub cache (taken by id, offline, under DDP) or as a folder (FSDP2, ZeRO-3), trained with
SFT on chat messages on 2 CPU ranks; the run's `--format hf` export loads in transformers with the model's
logits and the source tokenizer's chat template."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import put_in_hub_cache, run_torchrun, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

HUB_ID = "bigtrain-test/tiny-llama-chat"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STRATEGIES = {"ddp": ["parallel.strategy=ddp"], "fsdp": ["parallel.strategy=fsdp"],
              "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """The model folder (also in a hub cache), and a chat dataset: the user gives a line of textwrap.py,
    the assistant answers with the next one."""
    from bigtrain.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("hf-chat")
    lines = [line.strip() for line in Path(textwrap.__file__).read_text().splitlines() if len(line.strip()) > 8]
    tok = train_bpe(iter([lines]), 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = root / "model"
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    chats = [[{"role": "user", "content": a[:60]}, {"role": "assistant", "content": b[:60]}]
             for a, b in zip(lines[::2], lines[1::2])]
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"chat": chat}) + "\n" for chat in chats))
    hub = root / "hub"
    put_in_hub_cache(hub, HUB_ID, folder)
    return {"folder": folder, "hub": hub, "data": data, "chat": chats[0]}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_imported_llama_fine_tunes_on_chats_and_exports_to_transformers(tmp_path, cache_dir, source, strategy):
    from bigtrain.checkpoint.export import export_hf
    from bigtrain.eval.generator import load_generator

    init_from = HUB_ID if strategy == "ddp" else str(source["folder"])
    recipe = write_recipe(tmp_path / "sft.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", model={"max_seq_len": 128}, task={"name": "sft"},
        data={"source": str(source["data"]), "messages_column": "chat", "seq_len": 64, "max_documents": None},
        train={"max_steps": 12, "global_batch_size": 8, "micro_batch_size": 2}, optim={"lr": 3e-3, "warmup_steps": 2},
        eval={"max_samples": 16, "every": 12}))
    result = run_torchrun(2, "train", str(recipe), f"model.init_from={init_from}", "run.name=sft",
                          *STRATEGIES[strategy], env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(source["hub"])})
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "sft"
    records, evals = read_metrics(run_dir)
    first, last = records[0]["train/loss"], sum(r["train/loss"] for r in records[-3:]) / 3
    print(f"{strategy}: train loss {first:.3f} → {last:.3f}, eval {evals[-1]['eval/loss']:.3f}")
    assert last < first - 0.5, (first, last)
    assert json.loads((run_dir / "init_from.json").read_text())["new"] == []  # every tensor came from the model

    out = export_hf(run_dir / "checkpoints" / "step-0000012", tmp_path / "exported")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_generator(run_dir).model.eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).float()[..., :320] - theirs(ids).logits.float()).abs().max().item()
    print(f"{strategy}: fine-tuned → export: max |logits bigtrain - transformers| = {diff:.2e}")
    assert diff <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(source["folder"])
    assert tokenizer.eos_token == "<|im_end|>"
    assert (tokenizer.apply_chat_template(source["chat"], tokenize=False)
            == original.apply_chat_template(source["chat"], tokenize=False))
