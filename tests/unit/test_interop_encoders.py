"""Tests for bigtrain/interop/hf_encoders.py: Hugging Face BERT / RoBERTa encoders in (model.init_from) and
out (export --format hf), with exact numerics against transformers' own model code (tiny random models,
fp32, CPU), padded batches included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from bigtrain.checkpoint import load_init_weights  # noqa: E402
from bigtrain.cli import main  # noqa: E402
from bigtrain.config import Config, DataConfig, ModelConfig, TaskConfig  # noqa: E402
from bigtrain.checkpoint.export import export_hf  # noqa: E402
from bigtrain.interop.hf_config import with_hf_model  # noqa: E402
from bigtrain.models import build_model, count_params  # noqa: E402
from tests.conftest import run_cli, tiny_recipe, write_recipe  # noqa: E402
from tests.unit.test_interop import TOL, VOCAB, checkpoint_of, one_line_error, recipe_for  # noqa: E402

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
# name -> (config class, model class, kwargs)
ENCODERS = {
    "bert-mlm": ("BertConfig", "BertForMaskedLM", SMALL),
    "bert-mlm-tanh-gelu": ("BertConfig", "BertForMaskedLM", dict(SMALL, hidden_act="gelu_new", type_vocab_size=3,
                                                                 layer_norm_eps=1e-5)),
    "roberta-mlm": ("RobertaConfig", "RobertaForMaskedLM", dict(SMALL, max_position_embeddings=66, type_vocab_size=1)),
    "bert-classify": ("BertConfig", "BertForSequenceClassification", dict(SMALL, num_labels=3)),
}
LENGTHS = [24, 17, 9]  # a right-padded batch
DOCSTRINGS = {"source": "python-stdlib-docstrings", "max_documents": 300, "validation_split": 0.1}


def hf_encoder(tmp_path: Path, name: str, *, tokenizer: Path | None = None, **overrides) -> Path:
    """A tiny random HF encoder saved with save_pretrained; every weight perturbed (norms and biases too)."""
    config_cls, model_cls, kwargs = ENCODERS[name]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / name
    model.save_pretrained(folder)
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def bigtrain_encoder(folder: Path, task: str = "masked_lm", num_labels: int | None = None):
    """The bigtrain model of an HF encoder folder, through the init_from path; returns (model, report)."""
    cfg = with_hf_model(Config(model=ModelConfig(arch="encoder", init_from=str(folder)), data=DataConfig(seq_len=32),
                               task=TaskConfig(name=task)))
    classify = task == "classification"
    model = build_model(cfg.model, cfg.model.vocab_size, head="classify" if classify else "lm",
                        num_labels=num_labels if classify else None)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report, weights = load_init_weights(folder, expected, arch="encoder")
    model.load_state_dict(weights, strict=False)
    return model.eval(), report, cfg


def padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, bool mask (B, T) True at real tokens); no pad id among real tokens."""
    T = max(LENGTHS)
    ids = torch.randint(pad_id + 1, VOCAB, (len(LENGTHS), T), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]
    return ids.masked_fill(~mask, pad_id), mask


def parity(name: str, folder: Path) -> float:
    _, model_cls, kwargs = ENCODERS[name]
    classify = "Classification" in model_cls
    ours, report, _ = bigtrain_encoder(folder, "classification" if classify else "masked_lm",
                                       num_labels=kwargs.get("num_labels"))
    assert report["new"] == [] and report["unused"] == []
    theirs = getattr(transformers, model_cls).from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = padded_batch(theirs.config.pad_token_id)
    with torch.no_grad():
        logits = ours(ids, attn_mask=mask[:, None, None, :], lengths=mask.sum(1))
        reference = theirs(input_ids=ids, attention_mask=mask.long()).logits
        if classify:
            return (logits - reference).abs().max().item()
        return (logits - reference)[mask].abs().max().item()  # real tokens: padding's logits are never read


@pytest.mark.parametrize("name", ENCODERS)
def test_import_gives_transformers_logits_on_a_padded_batch(tmp_path, name):
    folder = hf_encoder(tmp_path, name)
    diff = parity(name, folder)
    print(f"{name}: max |logits bigtrain - transformers| (padded batch, attention mask) = {diff:.2e}")
    assert diff <= TOL


def test_imported_encoder_counts_its_parameters_as_transformers(tmp_path):
    for name in ("bert-mlm", "roberta-mlm", "bert-classify"):
        folder = hf_encoder(tmp_path, name)
        ours, _, _ = bigtrain_encoder(folder, "classification" if name == "bert-classify" else "masked_lm", 3)
        theirs = getattr(transformers, ENCODERS[name][1]).from_pretrained(folder)
        assert count_params(ours.spec) == ours.num_params() == theirs.num_parameters(), name


@pytest.mark.parametrize("name", ["bert-mlm", "roberta-mlm", "bert-classify"])
def test_round_trip_hf_bigtrain_hf_is_bit_identical(tmp_path, name):
    folder = hf_encoder(tmp_path, name)
    task = "classification" if name == "bert-classify" else "masked_lm"
    model, _, cfg = bigtrain_encoder(folder, task, num_labels=3)
    out = export_hf(checkpoint_of(tmp_path, model, cfg), tmp_path / "out")
    source, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(exported) == set(source)
    for tensor_name, tensor in source.items():
        assert exported[tensor_name].dtype == tensor.dtype and torch.equal(exported[tensor_name], tensor), tensor_name
    config, original = json.loads((out / "config.json").read_text()), json.loads((folder / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_act", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "tie_word_embeddings"):
        assert config[key] == original[key], key
    assert not (out / "generation_config.json").exists()


def test_default_pre_norm_encoder_and_roberta_classifier_do_not_export(tmp_path):
    from bigtrain.core.errors import UserError

    cfg = Config(model=ModelConfig(arch="encoder", preset="debug"))
    with pytest.raises(UserError, match="model.arch=encoder with norm_position=pre.*no exact Hugging Face class"):
        export_hf(checkpoint_of(tmp_path / "a", build_model(cfg.model, VOCAB), cfg), tmp_path / "out")
    folder = hf_encoder(tmp_path, "roberta-mlm")
    model, _, cfg = bigtrain_encoder(folder, "classification", num_labels=2)
    with pytest.raises(UserError, match="position_offset=2"):
        export_hf(checkpoint_of(tmp_path / "b", model, cfg), tmp_path / "out")


def test_other_num_labels_makes_a_new_classifier_and_masked_lm_a_new_head(tmp_path):
    folder = hf_encoder(tmp_path, "bert-classify")
    _, report, _ = bigtrain_encoder(folder, "classification", num_labels=5)
    assert report["new"] == ["classifier.weight", "classifier.bias"]
    assert report["unused"] == ["classifier.weight", "classifier.bias"]
    assert "pooler.weight" in report["loaded"] and "type_emb.weight" in report["loaded"]
    _, report, _ = bigtrain_encoder(folder, "masked_lm")
    assert set(report["new"]) == {"mlm_head.transform.weight", "mlm_head.transform.bias", "mlm_head.norm.weight",
                                  "mlm_head.norm.bias", "mlm_head.proj.bias"}
    assert set(report["unused"]) == {"pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}


# --------------------------------------------------------------------------- tokenizer, data, CLI


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory) -> Path:
    """An HF BERT WordPiece tokenizer.json (< VOCAB tokens, [PAD] [UNK] [CLS] [SEP] [MASK])."""
    import textwrap

    import tokenizers

    tok = tokenizers.BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(Path(textwrap.__file__).read_text().splitlines(), vocab_size=300)
    path = tmp_path_factory.mktemp("wordpiece") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_wordpiece_tokenizer_drives_masked_lm_and_classification_data(tmp_path, cache_dir, wordpiece):
    import tokenizers

    from bigtrain.data import prepare_data

    vocab = tokenizers.Tokenizer.from_file(str(wordpiece)).get_vocab()
    data_cfg = DataConfig(**DOCSTRINGS, seq_len=32, tokenizer=str(wordpiece), cache_dir=str(cache_dir))
    mlm = prepare_data(data_cfg, task="masked_lm", log=lambda m: None)
    assert (mlm.mask_id, mlm.pad_id) == (vocab["[MASK]"], vocab["[PAD]"])
    classify = prepare_data(data_cfg, task="classification", log=lambda m: None)
    assert classify.cls_id == vocab["[CLS]"] and classify.sep_id == vocab["[SEP]"] and len(classify.labels) >= 2


def test_cli_fine_tunes_an_imported_bert_classifier_then_exports_it(tmp_path, cache_dir, wordpiece):
    """Starts processes: `bigtrain train` (classification) from an HF BertForSequenceClassification folder of
    another num_labels, then `bigtrain export --format hf`, loaded by transformers with the same logits."""
    folder = hf_encoder(tmp_path, "bert-classify", tokenizer=wordpiece, num_labels=2)
    recipe = write_recipe(tmp_path / "ft.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", model={"arch": "encoder"}, task={"name": "classification"},
        data=DOCSTRINGS,
        train={"max_steps": 4}, eval={"every": 4, "max_samples": 16}, checkpoint={"every": 0, "keep_last": 1}))
    result = run_cli("train", str(recipe), f"model.init_from={folder}", "run.name=ft")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "ft"
    report = json.loads((run_dir / "init_from.json").read_text())
    assert "blocks.1.attn.qkv.weight" in report["loaded"] and "pooler.weight" in report["loaded"]
    assert report["new"] == ["classifier.weight", "classifier.bias"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = next(r for r in rows if "eval/loss" in r)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(evals["eval/loss"]) and 0 <= evals["eval/accuracy"] <= 1, evals

    assert main(["export", str(run_dir), str(tmp_path / "hf"), "--format", "hf"]) == 0
    labels = json.loads((run_dir / "labels.json").read_text())
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.num_labels == len(labels) and theirs.config.id2label[0] == str(labels[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.mask_token == "[MASK]" and tokenizer.cls_token == "[CLS]" and tokenizer.pad_token == "[PAD]"
    ours, _, _ = bigtrain_encoder(tmp_path / "hf", "classification", num_labels=len(labels))
    ids, mask = padded_batch(theirs.config.pad_token_id)
    with torch.no_grad():
        diff = (ours(ids, attn_mask=mask[:, None, None, :]) - theirs(input_ids=ids, attention_mask=mask.long()).logits)
    print(f"fine-tuned BERT classifier → export: max |logits bigtrain - transformers| = {diff.abs().max():.2e}")
    assert diff.abs().max().item() <= TOL


@pytest.mark.slow
def test_lora_bert_classifier_exports_a_peft_adapter_that_gives_its_logits(tmp_path, cache_dir, wordpiece):
    """Starts processes: a LoRA fine-tune (model.lora, new classifier head) of an imported BERT classifier, then
    `bigtrain export --format hf --adapter`: peft applies the folder (adapters on query/key/value/dense modules,
    the trained classifier and pooler as modules_to_save) to the original HF folder with bigtrain's logits."""
    peft = pytest.importorskip("peft")
    from bigtrain.checkpoint import list_checkpoints
    from bigtrain.config import LoraConfig
    from bigtrain.checkpoint import open_weights

    folder = hf_encoder(tmp_path, "bert-classify", tokenizer=wordpiece, num_labels=2)
    lora = {"rank": 4, "alpha": 8.0}
    recipe = write_recipe(tmp_path / "ft.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", model={"arch": "encoder", "lora": lora}, task={"name": "classification"},
        data=DOCSTRINGS, train={"max_steps": 3}, optim={"lr": 1e-2}, checkpoint={"every": 0, "keep_last": 1}))
    result = run_cli("train", str(recipe), f"model.init_from={folder}", "run.name=lora")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lora"
    assert main(["export", str(run_dir), str(tmp_path / "adapter"), "--format", "hf", "--adapter"]) == 0
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    labels = json.loads((run_dir / "labels.json").read_text())

    reader = open_weights(list_checkpoints(run_dir)[-1])
    cfg = with_hf_model(Config(model=ModelConfig(arch="encoder", init_from=str(folder), lora=LoraConfig(**lora)),
                               data=DataConfig(seq_len=32), task=TaskConfig(name="classification")))
    ours = build_model(cfg.model, cfg.model.vocab_size, head="classify", num_labels=len(labels))
    ours.load_state_dict({name: reader.get(name) for name in reader.tensors()}, strict=True)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), ignore_mismatched_sizes=True)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = padded_batch(base.config.pad_token_id)
    with torch.no_grad():
        want = ours.eval()(ids, attn_mask=mask[:, None, None, :])
        diff = (want - theirs(input_ids=ids, attention_mask=mask.long()).logits).abs().max().item()
        plain = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=len(labels), ignore_mismatched_sizes=True).eval()
        assert (plain(input_ids=ids, attention_mask=mask.long()).logits - want).abs().max() > 1e-2  # not the base
    print(f"LoRA BERT classifier → PEFT adapter: max |logits bigtrain - peft| = {diff:.2e}")
    assert diff <= TOL


# --------------------------------------------------------------------------- bad input


def test_unsupported_encoder_architecture_is_one_line_exit_2(tmp_path, cache_dir, capsys):
    folder = tmp_path / "electra"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["ElectraForMaskedLM"], "vocab_size": 30}))
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir, arch="encoder")),
                                  f"model.init_from={folder}", "task.name=masked_lm"])
    assert "['ElectraForMaskedLM']" in err and "BertForMaskedLM" in err and "RobertaForMaskedLM" in err


def test_encoder_shape_mismatch_is_one_line_exit_2(tmp_path, cache_dir, capsys, wordpiece):
    folder = hf_encoder(tmp_path, "bert-mlm", tokenizer=wordpiece)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir, arch="encoder")),
                                  f"model.init_from={folder}", "task.name=masked_lm"])
    assert "mlp.in_proj.weight" in err and "(128, 64)" in err and "(96, 64)" in err


def test_encoder_contradicting_recipe_keys_are_one_line_exit_2(tmp_path, cache_dir, capsys, wordpiece):
    folder = hf_encoder(tmp_path, "roberta-mlm", tokenizer=wordpiece)
    recipe = recipe_for(tmp_path, cache_dir, arch="encoder")
    err = one_line_error(capsys, ["train", str(recipe), f"model.init_from={folder}", "task.name=masked_lm",
                                  "model.norm_position=pre"])
    assert "model.norm_position=\"pre\"" in err and "norm_position=\"post\"" in err
    err = one_line_error(capsys, ["train", str(recipe_for(tmp_path, cache_dir)), f"model.init_from={folder}",
                                  "task.name=masked_lm"])
    assert "model.arch=decoder" in err and "set model.arch: encoder" in err
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
    err = one_line_error(capsys, ["train", str(recipe), f"model.init_from={folder}", "task.name=masked_lm"])
    assert "hidden_act=\"gelu_new\"" in err
