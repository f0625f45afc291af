"""LoRA (model.lora, bigtrain/models/lora.py): a frozen base with trained low-rank adapters — the model starts
as its base, only the adapters learn, and what it trains exports as a merged Hugging Face model and as a PEFT
adapter folder, each giving bigtrain's logits in transformers / peft."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from bigtrain.config import Config, DataConfig, LoraConfig, ModelConfig  # noqa: E402
from bigtrain.interop.hf_config import with_hf_model  # noqa: E402
from bigtrain.models import build_model  # noqa: E402
from tests.conftest import run_cli, tiny_recipe, write_recipe  # noqa: E402
from tests.unit.test_interop import TOL, bpe, hf_folder, ids  # noqa: E402, F401

LORA = {"rank": 4, "alpha": 8.0}


def test_a_lora_model_starts_as_its_base_and_trains_only_its_adapters():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(preset="debug", max_seq_len=64), 320).eval()
    torch.manual_seed(0)
    lora = build_model(ModelConfig(preset="debug", max_seq_len=64, lora=LoraConfig(rank=4, alpha=8.0)), 320).eval()
    tokens = ids()
    with torch.no_grad():
        torch.testing.assert_close(lora(tokens), plain(tokens), rtol=0, atol=0)  # B = 0: exactly the base
    trained = {name for name, p in lora.named_parameters() if p.requires_grad}
    layers = len(lora.blocks)
    assert trained == {f"blocks.{i}.{path}.lora_{m}" for i in range(layers)
                       for path in ("attn.qkv", "attn.out_proj", "mlp.in_proj", "mlp.out_proj") for m in "AB"}
    assert set(plain.state_dict()) == {k for k in lora.state_dict() if ".lora_" not in k}  # base names unchanged
    base = {k: v.clone() for k, v in lora.state_dict().items() if ".lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(2):
        lora(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in base.items())  # the base never moves
    assert lora.blocks[0].attn.qkv.lora_B.abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(lora.eval()(tokens), plain(tokens))


def test_a_frozen_base_held_in_bf16_computes_what_autocast_computes_from_fp32():
    """Mixed precision keeps the LoRA base's block Linears in the compute dtype (hold_frozen_linears_in): autocast
    casts them there at each use anyway, so logits and the adapters' gradients are bitwise the fp32-held base's."""
    import copy

    from bigtrain.parallel.precision import hold_frozen_linears_in

    torch.manual_seed(0)
    fp32 = build_model(ModelConfig(preset="debug", max_seq_len=64, lora=LoraConfig(rank=4, alpha=8.0)), 320)
    with torch.no_grad():
        for block in fp32.blocks:  # adapters that do something
            for module in block.modules():
                if hasattr(module, "lora_B"):
                    module.lora_B.normal_(0.0, 0.02)
    held = copy.deepcopy(fp32)
    hold_frozen_linears_in(held, torch.bfloat16)
    qkv = held.blocks[0].attn.qkv
    assert qkv.weight.dtype == qkv.bias.dtype == torch.bfloat16 and qkv.lora_A.dtype == torch.float32
    assert held.tok_emb.weight.dtype == held.blocks[0].attn_norm.weight.dtype == torch.float32
    tokens = ids()
    outputs = []
    for model in (fp32, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        logits.float().square().mean().backward()
        outputs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][1].keys() == outputs[1][1].keys()
    assert all(torch.equal(outputs[0][1][n], outputs[1][1][n]) for n in outputs[0][1])


def test_a_bf16_lora_run_checkpoints_its_base_in_bf16_and_exports_it_merged_in_fp32(tmp_path, cache_dir):
    """`bigtrain train` with model.lora under bf16 mixed precision: the checkpoint holds the blocks' frozen Linears in
    bf16 (the adapters, embeddings and norms in fp32), and `bigtrain export --format hf` merges the adapters into
    fp32 weights."""
    from safetensors.torch import load_file

    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.models.lora import merged_weight
    from bigtrain.checkpoint import open_weights

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", model={"lora": LORA},
                                                           train={"max_steps": 2}, parallel={"precision": "bf16"}))
    result = run_cli("train", str(recipe), "run.name=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    reader = open_weights(list_checkpoints(tmp_path / "runs/bf16")[-1])
    dtypes = {name: meta[0] for name, meta in reader.tensors().items()}
    assert dtypes["blocks.0.attn.qkv.weight"] == dtypes["blocks.1.mlp.out_proj.bias"] == torch.bfloat16
    assert dtypes["blocks.0.attn.qkv.lora_A"] == dtypes["tok_emb.weight"] == dtypes["norm.weight"] == torch.float32
    result = run_cli("export", str(tmp_path / "runs/bf16"), str(tmp_path / "out"), "--format", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(tmp_path / "out/model.safetensors")["transformer.h.0.attn.c_attn.weight"]  # GPT-2's Conv1D
    want = merged_weight(reader.get("blocks.0.attn.qkv.weight"), reader.get("blocks.0.attn.qkv.lora_A"),
                         reader.get("blocks.0.attn.qkv.lora_B"), LORA["alpha"] / LORA["rank"])
    assert want.dtype == exported.dtype == torch.float32
    assert torch.equal(exported, want.t())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-untied-llama3-rope"])
def test_lora_fine_tune_of_an_hf_model_exports_merged_and_as_a_peft_adapter(tmp_path, cache_dir, bpe, family):
    """`bigtrain train` with model.lora on an imported model, then `bigtrain export --format hf` (merged) and
    `--format hf --adapter` (PEFT): both give bigtrain's logits, through transformers and peft respectively; and
    model.init_from of the run gives a plain model those logits (the adapters merged).
    GPT-2 has fused Conv1D modules (fan_in_fan_out); Llama's q/k/v and gate/up are separate HF modules that
    share bigtrain's fused adapter A."""
    from bigtrain.checkpoint import list_checkpoints, load_init_weights
    from bigtrain.checkpoint import open_weights
    from bigtrain.parallel import local

    folder = hf_folder(tmp_path, family, tokenizer=bpe)
    recipe = write_recipe(tmp_path / "lora.yaml", tiny_recipe(cache_dir, tmp_path / "runs", model={"lora": LORA},
                                                              train={"max_steps": 4}, optim={"lr": 1e-2,
                                                                                             "warmup_steps": 0}))
    result = run_cli("train", str(recipe), f"model.init_from={folder}", "run.name=lora")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora: trainable " in result.stderr and "parameters (" in result.stderr
    run_dir = tmp_path / "runs/lora"
    reader = open_weights(list_checkpoints(run_dir)[-1])  # the adapters saved, the base read from the HF folder
    trained = {name: reader.get(name) for name in reader.tensors()}
    own = local.open_weights(list_checkpoints(run_dir)[-1]).tensors()
    assert own and all(name.endswith((".lora_A", ".lora_B")) for name in own)

    cfg = with_hf_model(Config(model=ModelConfig(init_from=str(folder), lora=LoraConfig(**LORA)),
                               data=DataConfig(seq_len=32)))
    ours = build_model(cfg.model, cfg.model.vocab_size)
    ours.load_state_dict(trained, strict=True)
    ours.eval()
    tokens = ids()
    with torch.no_grad():
        want = ours(tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (want - base(tokens).logits).abs().max() > 1e-3  # the adapters changed the model
    for name, tensor in base.state_dict().items():  # ... and the base stayed the HF folder's (frozen)
        if name == "transformer.h.0.attn.c_attn.weight":
            assert torch.equal(trained["blocks.0.attn.qkv.weight"], tensor.t())
        elif name == "model.layers.0.self_attn.o_proj.weight":
            assert torch.equal(trained["blocks.0.attn.out_proj.weight"], tensor)

    # model.init_from of the LoRA run: the adapters merged into the weights (a plain model gives its logits).
    plain = build_model(dataclasses.replace(cfg.model, lora=None), cfg.model.vocab_size).eval()
    expected = {name: tuple(t.shape) for name, t in plain.state_dict().items()}
    report, weights = load_init_weights(list_checkpoints(run_dir)[-1], expected, arch="decoder")
    assert report["new"] == [] and not any("lora_" in name for name in report["unused"])
    plain.load_state_dict({name: weights[name] for name in expected}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), want, rtol=0, atol=TOL)

    merged = tmp_path / "merged"
    result = run_cli("export", str(run_dir), str(merged), "--format", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_diff = (theirs(tokens).logits - want).abs().max().item()

    adapter = tmp_path / "adapter"
    result = run_cli("export", str(run_dir), str(adapter), "--format", "hf", "--adapter")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        peft_diff = (with_adapter(tokens).logits - want).abs().max().item()
    print(f"{family} LoRA: max |logits| difference, merged export {merged_diff:.2e}, PEFT adapter {peft_diff:.2e}")
    assert merged_diff <= TOL and peft_diff <= TOL


@pytest.mark.slow
def test_lora_trains_alike_under_single_ddp_and_fsdp_with_checkpointing(tmp_path, cache_dir):
    """The adapters replicated (ddp) or sharded with the frozen base (fsdp), with activation checkpointing: the
    losses of one process, and the base weights unchanged in every checkpoint."""
    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.checkpoint import open_weights
    from tests.conftest import run_torchrun
    from tests.integration.test_train import read_metrics

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", model={"lora": LORA},
                                                           train={"max_steps": 4}, optim={"lr": 1e-2},
                                                           parallel={"activation_checkpointing": "full"}))
    single = run_cli("train", str(recipe), "run.name=single")
    assert single.returncode == 0, single.stderr[-3000:]
    losses = {}
    for strategy in ("single", "ddp", "fsdp"):
        if strategy != "single":
            result = run_torchrun(2, "train", str(recipe), f"run.name={strategy}", f"parallel.strategy={strategy}")
            assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tmp_path / "runs" / strategy
        losses[strategy] = [r["train/loss"] for r in read_metrics(run_dir)[0]]
        reader = open_weights(list_checkpoints(run_dir)[-1])
        for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.out_proj.weight", "tok_emb.weight"):
            if strategy == "single":
                torch.manual_seed(0)
                first = build_model(ModelConfig(preset="debug", max_seq_len=64, lora=LoraConfig(**LORA)),
                                    reader.tensors()["tok_emb.weight"][1][0])
            assert torch.equal(reader.get(name), first.state_dict()[name]), (strategy, name)  # frozen
        assert reader.get("blocks.0.attn.qkv.lora_B").abs().sum() > 0
    assert losses["single"][-1] < losses["single"][0]
    for strategy in ("ddp", "fsdp"):
        assert losses[strategy] == pytest.approx(losses["single"], rel=1e-5), strategy


@pytest.mark.slow
def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly_on_any_world_size(tmp_path, cache_dir):
    """A LoRA run from a base checkpoint saves the adapters, optimizer and trainer state plus base.json (the
    base's folder and sha256), not the frozen base: its checkpoint files are a fraction of the base's. Resumes
    (single: bit for bit; fsdp from 2 processes to 1: DCP reshards) log the losses of an uninterrupted run, export
    gives the whole model back, and a resume on another base is a one-line error, exit 2."""
    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.checkpoint import open_weights
    from bigtrain.parallel import fsdp as fsdp_strategy, local
    from tests.conftest import run_torchrun
    from tests.integration.test_train import read_metrics

    runs = tmp_path / "runs"
    base_recipe = write_recipe(tmp_path / "base.yaml", tiny_recipe(cache_dir, runs, train={"max_steps": 2}))
    for name in ("base", "other-base"):
        result = run_cli("train", str(base_recipe), f"run.name={name}", f"run.seed={len(name)}")
        assert result.returncode == 0, result.stderr[-3000:]
    base = list_checkpoints(runs / "base")[-1]
    recipe = write_recipe(tmp_path / "lora.yaml", tiny_recipe(
        cache_dir, runs, model={"lora": LORA, "init_from": str(runs / "base")}, train={"max_steps": 4},
        optim={"lr": 1e-2}, checkpoint={"every": 2, "keep_last": 0}))

    def train(name: str, *extra: str, nproc: int = 1):
        args = ("train", str(recipe), f"run.name={name}", *extra)
        result = run_cli(*args) if nproc == 1 else run_torchrun(nproc, *args, "parallel.strategy=fsdp")
        assert result.returncode == 0, result.stderr[-3000:]
        return read_metrics(runs / name)[0]

    straight = train("straight")
    train("resumed", "train.stop_at_step=2")
    resumed = train("resumed")  # metrics.jsonl: steps 1-2 of the first start, 3-4 of the resumed one
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in straight]  # bit for bit

    folder = list_checkpoints(runs / "straight")[-1]
    own = local.open_weights(folder).tensors()  # the checkpoint's own tensors, without the base
    assert own and all(name.endswith((".lora_A", ".lora_B")) for name in own)
    saved = json.loads((folder / "base.json").read_text())
    assert saved["init_from"] == str(base) and len(saved["sha256"]) == 64 and "tok_emb.weight" in saved["tensors"]
    assert (folder / "model.pt").stat().st_size < (base / "model.pt").stat().st_size / 5
    whole = open_weights(folder)  # the base's tensors put back: the model the run trained, whole
    assert set(whole.tensors()) == set(own) | set(saved["tensors"])
    assert torch.equal(whole.get("blocks.0.mlp.in_proj.weight"), open_weights(base).get("blocks.0.mlp.in_proj.weight"))
    exported = run_cli("export", str(runs / "straight"), str(tmp_path / "merged"), "--format", "hf")
    assert exported.returncode == 0, exported.stderr[-3000:]

    sharded = train("fsdp", nproc=2)
    train("elastic", "train.stop_at_step=2", nproc=2)
    resumed = train("elastic", "parallel.strategy=fsdp", "train.micro_batch_size=4")  # 1 process: accumulating
    assert [r["train/loss"] for r in resumed] == pytest.approx([r["train/loss"] for r in sharded], rel=1e-5)
    dcp_own = fsdp_strategy.open_weights(list_checkpoints(runs / "elastic")[-1]).tensors()
    assert dcp_own.keys() == own.keys()
    assert torch.equal(open_weights(list_checkpoints(runs / "elastic")[-1]).get("tok_emb.weight"),
                       open_weights(base).get("tok_emb.weight"))

    moved = run_cli("train", str(recipe), "run.name=straight", f"model.init_from={runs / 'other-base'}",
                    "train.max_steps=6")
    assert moved.returncode == 2
    line = moved.stderr.strip().splitlines()[-1]
    assert "holds LoRA adapters trained on" in line and "resume with the base it was trained on" in line, line


def test_base_reference_reads_a_local_hf_base_again_only_when_a_file_changes_size_or_mtime(tmp_path):
    """base.json keeps each local weights file's size, mtime and sha256: a resume of a LoRA run from a local
    Hugging Face folder reads those files again only if they changed (an 8B base: ~16 GB per start otherwise)."""
    import hashlib
    import os

    from bigtrain.checkpoint import base_reference

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = base_reference(folder, {"w": "w"})
    line = f"model.safetensors {hashlib.sha256(b'a' * 1000).hexdigest()}\n"
    assert first["sha256"] == hashlib.sha256(line.encode()).hexdigest()
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # other bytes, same size and mtime
    assert base_reference(folder, {"w": "w"}, first)["sha256"] == first["sha256"]  # taken from base.json, not read
    assert base_reference(folder, {"w": "w"})["sha256"] != first["sha256"]  # read: the new bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert base_reference(folder, {"w": "w"}, first)["sha256"] != first["sha256"]  # another mtime: read again
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert base_reference(moved, {"w": "w"}, first)["sha256"] != first["sha256"]  # another base: nothing reused


# --------------------------------------------------------------------------- a LoRA run's readers

@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, cache_dir):
    """runs/scratch: LoRA on a random base, trained 2 steps (no init_from: its checkpoint holds every tensor);
    runs/lora: new adapters trained 2 steps on scratch's model (model.init_from of a LoRA run: its merged weights),
    whose checkpoint holds the adapters and base.json naming scratch's checkpoint."""
    tmp = tmp_path_factory.mktemp("lora-runs")
    runs = tmp / "runs"
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(cache_dir, runs, model={"lora": LORA}, train={"max_steps": 2},
                                                      optim={"lr": 1e-2}))
    for name, extra in (("scratch", ()), ("lora", (f"model.init_from={runs / 'scratch'}",))):
        result = run_cli("train", str(recipe), f"run.name={name}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return runs


def trained_lora_model(run_dir):
    """The model a LoRA run trained, as it trained it: built with model.lora, the adapters not merged."""
    import yaml

    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.config import build_config
    from bigtrain.checkpoint import open_weights
    from bigtrain.parallel import iter_weights

    folder = list_checkpoints(run_dir)[-1]
    cfg = build_config(yaml.safe_load((folder / "config.yaml").read_text()))
    weights = dict(iter_weights(open_weights(folder)))
    model = build_model(cfg.model, weights["tok_emb.weight"].shape[0])
    model.load_state_dict(weights, strict=True)
    assert cfg.model.lora is not None and weights["blocks.0.attn.qkv.lora_B"].abs().sum() > 0  # the adapters trained
    return model.eval().requires_grad_(False)


@pytest.mark.slow  # its module's fixture trains two runs in sequence
def test_generate_eval_and_lm_eval_of_a_lora_run_use_the_model_it_trained(lora_runs, tmp_path, capsys, monkeypatch):
    """`bigtrain generate RUN` of a LoRA run (from a base, or not): its model gives the trained LoRA model's logits,
    its greedy text is that model's. `bigtrain eval RUN`: the loss the run logged at its last step. `bigtrain eval
    RUN --tasks` (a local loglikelihood task): the perplexity of the LoRA model's log-likelihoods."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from bigtrain.cli import main
    from bigtrain.eval.generate import SamplingConfig, generate_text
    from bigtrain.eval.generator import load_generator
    from bigtrain.eval.lm_eval import BigtrainLM
    from tests.integration.test_train import read_metrics
    from tests.unit.test_lm_eval_adapter import LL_DOCS, task_yaml

    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    for run in ("lora", "scratch"):
        run_dir = lora_runs / run
        gen = load_generator(run_dir)
        as_trained = dataclasses.replace(gen, model=trained_lora_model(run_dir))
        with torch.no_grad():
            torch.testing.assert_close(gen.model(tokens), as_trained.model(tokens), rtol=0, atol=1e-5)
        assert main(["generate", str(run_dir), "--prompt", "def f", "--max-new-tokens", "8"]) == 0
        want = generate_text(as_trained, ["def f"], SamplingConfig(max_new_tokens=8), log=lambda line: None)
        assert capsys.readouterr().out == want[0] + "\n"

    run_dir = lora_runs / "lora"  # its base's tensors read from the base
    assert main(["eval", str(run_dir)]) == 0
    logged = read_metrics(run_dir)[1][-1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/loss"] == pytest.approx(
        logged["eval/loss"], rel=1e-6)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LL_DOCS))
    (tmp_path / "bt_ll.yaml").write_text(task_yaml(
        "bt_ll", tmp_path / "ll.jsonl", tmp_path / "cache", "loglikelihood",
        {"doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}", "target_delimiter": ""}, ["perplexity"]))
    assert main(["eval", str(run_dir), "--tasks", "bt_ll", "--include-path", str(tmp_path)]) == 0
    report = json.loads(next((run_dir / "eval").glob("lm-eval-step-*.json")).read_text())
    as_trained = dataclasses.replace(load_generator(run_dir), model=trained_lora_model(run_dir))
    requests = [Instance("loglikelihood", doc, (doc["context"], doc["continuation"]), i) for i, doc in enumerate(LL_DOCS)]
    loglikelihoods = [ll for ll, _ in BigtrainLM(as_trained).loglikelihood(requests)]
    perplexity = math.exp(-sum(loglikelihoods) / len(loglikelihoods))  # lm-eval's perplexity aggregation
    assert report["tasks"]["bt_ll"]["perplexity"] == pytest.approx(perplexity, rel=1e-5)


def resave_with_other_weights(folder) -> None:
    """Checkpoint `folder` written again with other weights, its manifest too: a base changed in place."""
    from bigtrain.core import filehash

    path = folder / "model.pt"
    weights = torch.load(path, weights_only=True)
    weights["tok_emb.weight"] += 1.0
    torch.save(weights, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.pt"] = filehash.file_entry(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow  # its module's fixture trains two runs in sequence
def test_every_reader_of_a_lora_checkpoint_refuses_a_changed_or_missing_base(lora_runs, tmp_path, cache_dir, capsys):
    """The base a LoRA checkpoint names (base.json) saved again with other weights, or gone: `bigtrain export`
    (both formats), `eval`, `generate` and `train` with model.init_from of the run each exit 2 with an error line
    naming the checkpoint and the base, and write nothing (no export folder, no eval report, no checkpoint)."""
    import shutil

    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.cli import main

    run_dir, base = lora_runs / "lora", list_checkpoints(lora_runs / "scratch")[-1]
    kept = tmp_path / "base-kept"
    reports = sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []

    def refused(*argv: str, changed: str = "has changed since") -> None:
        assert main(list(argv)) == 2, argv
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("bigtrain: error: checkpoint ") and f"trained on {base} (sha256 " in line, line
        assert changed in line, line

    shutil.copytree(base, kept)
    try:
        resave_with_other_weights(base)
        refused("export", str(run_dir), str(tmp_path / "hf"), "--format", "hf")
        refused("export", str(run_dir), str(tmp_path / "bigtrain"))
        refused("eval", str(run_dir))
        refused("generate", str(run_dir), "--prompt", "def f")
        recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs",
                                                               model={"init_from": str(run_dir)}))
        result = run_cli("train", str(recipe))  # the LoRA run's model, merged, as a new run's start
        assert result.returncode == 2 and not (tmp_path / "runs/tiny/checkpoints").exists()
        assert "has changed since" in result.stderr.strip().splitlines()[-1]
        shutil.rmtree(base)
        refused("generate", str(run_dir), "--prompt", "def f", changed="which is gone")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        kept.rename(base)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "bigtrain").exists()
    assert (sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []) == reports


def test_check_base_reuses_a_local_files_digest_only_at_the_size_and_mtime_it_was_recorded_with(tmp_path):
    """`check_base` of a checkpoint whose base is a local Hugging Face folder: the base unchanged passes; other
    bytes at the recorded size and mtime pass unread (the digest base.json recorded for exactly that file); the
    same bytes' file touched is read again, and other bytes then are a CheckpointError naming the base."""
    import os

    from bigtrain.checkpoint import BASE_FILE, CheckpointError, base_reference, check_base

    base, folder = tmp_path / "hf", tmp_path / "step-0000002"
    base.mkdir()
    folder.mkdir()
    (base / "config.json").write_text("{}")
    weights = base / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    (folder / BASE_FILE).write_text(json.dumps(base_reference(base, {"w": "w"})))
    assert check_base(folder)["init_from"] == str(base)
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check_base(folder)  # the recorded digest: not read
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(CheckpointError, match=f"trained on {base} .* but that base has changed since"):
        check_base(folder)
    weights.write_bytes(b"a" * 1000)
    check_base(folder)  # read again: the bytes it was trained on
