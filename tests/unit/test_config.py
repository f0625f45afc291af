"""Recipe loading, overrides and validation (bigtrain/config/: schema, load, validate), and every shipped recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bigtrain.config import ConfigError, build_config, load_config, recipe_warnings, validate
from tests.conftest import REPO, put_in_hub_cache, run_cli, write_recipe

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "pretrain/gpt2-124m.yaml", "pretrain/llama-1b.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_validates_and_names_its_command(recipe: Path):
    cfg = load_config(recipe, world_size=1)
    assert cfg.run.name
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# Run:") and "bigtrain" in first, f"{recipe} must open with the command that runs it"


# The config.json of the hub models shipped recipes fine-tune, as published (no weights needed to check).
HUB_CONFIGS = {
    "meta-llama/Llama-3.2-1B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "meta-llama/Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "google-bert/bert-base-uncased": {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
        "use_cache": True, "vocab_size": 30522},
}


HUB_CONFIGS["meta-llama/Llama-3.2-1B"] = {**HUB_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"], "eos_token_id": 128001}


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory) -> dict[str, str]:
    """A hub cache holding the config.json of every model a shipped recipe names, with the hub offline."""
    import json

    cache = tmp_path_factory.mktemp("hub")
    for repo_id, config in HUB_CONFIGS.items():
        folder = tmp_path_factory.mktemp("config")
        (folder / "config.json").write_text(json.dumps(config))
        put_in_hub_cache(cache, repo_id, folder)
    return {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


@pytest.fixture(scope="module")
def every_recipe_checked(hub_env) -> dict[str, str]:
    """`bigtrain check` of every shipped recipe in one command (a recipe per argument): each recipe's report."""
    result = run_cli("check", *(str(r.relative_to(REPO)) for r in RECIPES), env=hub_env)
    assert result.returncode == 0, result.stderr
    reports = re.split(r"^(?=recipe \S+: valid$)", result.stdout, flags=re.M)
    return {report.split()[1].rstrip(":"): report for report in reports if report.startswith("recipe ")}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_bigtrain_check_every_recipe(recipe: Path, every_recipe_checked):
    report = every_recipe_checked[str(recipe.relative_to(REPO))]
    assert "parameters" in report and "FLOPs/token" in report and "precision" in report


def test_check_of_several_recipes_reports_each_bad_one_in_a_line_and_exits_2(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", {"train": {"max_steps": -3}})
    result = run_cli("check", str(bad), "recipes/quickstart.yaml", "run.name=several", "recipes/pretrain/gpt2-124m.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"bigtrain: error: {bad}: train.max_steps=-3 must be > 0"]
    run_dirs = [l.split()[-1] for l in result.stdout.splitlines() if l.startswith("run dir")]
    assert len(run_dirs) == 2 and all(d.endswith("/several") for d in run_dirs)  # the override applies to each


def test_check_reports_the_size_of_a_hub_model_from_its_config_json(every_recipe_checked):
    report = every_recipe_checked["recipes/finetune/llama-3.2-1b-sft.yaml"]
    params = int(next(l for l in report.splitlines() if l.startswith("parameters")).split()[1].replace(",", ""))
    assert params == 1_235_814_400  # Llama 3.2 1B, tied embeddings (transformers' num_parameters())


def test_check_plans_the_8b_teacher_of_the_llama_1b_distillation_recipe(hub_env):
    """The cluster example: Llama 3.2 1B distilled from Llama 3.1 8B on 8 GPUs under fsdp; the teacher's bf16
    weights are sharded over the 8 ranks like the student's, and the whole plan fits an 80 GB GPU."""
    result = run_cli("check", "recipes/finetune/distill-llama-1b-from-8b.yaml", "--world-size", "8",
                     "--device-memory-gb", "80", env=hub_env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    teacher = next(l for l in lines if l.startswith("teacher"))
    assert "32 layers × d_model 4096" in teacher and "8,030,261,248 parameters" in teacher and "bfloat16" in teacher
    planned = next(l for l in lines if l.split()[:1] == ["teacher"] and l.strip().endswith("GB"))
    assert float(planned.split()[1]) == pytest.approx(8_030_261_248 * 2 / 8 / 1e9, abs=1e-3)  # bf16, 1/8 per rank
    assert any(l.strip().startswith("fits in 80 GB") for l in lines)


def test_check_reports_gpt2_124m_size(every_recipe_checked):
    report = every_recipe_checked["recipes/pretrain/gpt2-124m.yaml"]
    params = int(next(l for l in report.splitlines() if l.startswith("parameters")).split()[1].replace(",", ""))
    assert 123e6 < params < 126e6  # GPT-2 small with 50257 → 50304 padded vocab


def test_overrides_apply_with_types(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"train": {"max_steps": 10}})
    cfg = load_config(recipe, ["optim.lr=1e-3", "train.max_steps=20", "optim.betas=[0.8, 0.9]",
                               "parallel.activation_checkpointing=true", "run.name=abc"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 20
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.parallel.activation_checkpointing == "full"  # true: full, as when it was a boolean
    assert cfg.run_dir() == Path("runs") / "abc"


def test_run_name_defaults_to_recipe_stem(tmp_path):
    cfg = load_config(write_recipe(tmp_path / "my-run.yaml", {}))
    assert cfg.run.name == "my-run"


def test_accumulation_is_derived():
    cfg = build_config({"train": {"global_batch_size": 32, "micro_batch_size": 4}})
    assert cfg.train.accum_steps(1) == 8 and cfg.train.accum_steps(2) == 4


@pytest.mark.parametrize("raw, message", [
    ({"train": {"lr": 1}}, "unknown key 'train.lr' — did you mean 'optim.lr'?"),
    ({"optim": {"lrr": 1}}, "did you mean 'optim.lr'?"),
    ({"trian": {}}, "unknown section 'trian' — did you mean 'train'?"),
    ({"train": {"max_steps": "ten"}}, "train.max_steps must be int"),
    ({"train": {"max_steps": True}}, "train.max_steps must be int"),
    ({"parallel": {"precision": "fp8"}}, "parallel.precision='fp8' is not one of"),
    ({"optim": {"betas": [0.9]}}, "optim.betas must be"),
    ({"optim": {"lr": float("nan")}}, "optim.lr=nan must be a finite number"),
    ({"optim": {"lr": "inf"}}, "optim.lr='inf' must be a finite number"),
    ({"model": {"dropout": float("-inf")}}, "model.dropout=-inf must be a finite number"),
])
def test_bad_keys_and_types_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw, world, message", [
    ({"train": {"global_batch_size": 12, "micro_batch_size": 8}}, 1, "train.global_batch_size=12 is not divisible"),
    ({"train": {"global_batch_size": 16, "micro_batch_size": 4}}, 3, "4 × 3 = 12"),
    ({"train": {"max_steps": 10, "stop_at_step": 11}}, 1, "train.stop_at_step=11"),
    ({"task": {"mask_prob": 2}}, 1, "task.mask_prob=2.0 must be in (0, 1]"),
    ({"task": {"mask_prob": 0}}, 1, "task.mask_prob=0.0 must be in (0, 1]"),
    ({"optim": {"eps": 0}}, 1, "optim.eps=0.0 must be > 0"),
    ({"train": {"micro_batch_size": 0}}, 1, "train.micro_batch_size=0 must be > 0"),
    ({"data": {"source": "/no/such/file.jsonl"}}, 1, "data.source: no such file or folder '/no/such/file.jsonl'"),
    ({"data": {"tokenizer": "/no/tok.json"}}, 1, "data.tokenizer: no such file '/no/tok.json'"),
    ({"parallel": {"strategy": "single"}}, 2, "parallel.strategy=single"),
])
def test_cross_field_rules(raw, world, message):
    with pytest.raises(ConfigError) as info:
        validate(build_config(raw), world_size=world)
    assert message in str(info.value)


def test_warmup_longer_than_the_run_is_a_warning_not_an_error():
    cfg = build_config({"optim": {"warmup_steps": 2000, "lr": 1e-3}, "train": {"max_steps": 10}})
    validate(cfg)
    assert recipe_warnings(cfg) == ["warning: optim.warmup_steps=2000 exceeds train.max_steps=10: the LR rises along the "
                             "warmup and stops at 5e-06, never reaching optim.lr=0.001"]
    assert recipe_warnings(build_config({})) == []


def test_yaml_nan_and_inf_are_refused_on_the_command_line(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {})
    result = run_cli("check", str(recipe), "optim.lr=.nan")
    assert result.returncode == 2
    assert result.stderr.strip() == f"bigtrain: error: {recipe}: optim.lr=nan must be a finite number"


@pytest.mark.parametrize("content, args, message", [
    ({"train": {"lr": 1e-3}}, [], "unknown key 'train.lr' — did you mean 'optim.lr'?"),
    ({"train": {"max_steps": "x"}}, [], "train.max_steps must be int"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, [], "train.global_batch_size=10 is not divisible"),
    ({"data": {"source": "missing.jsonl"}}, [], "data.source: no such file or folder 'missing.jsonl'"),
    ({}, ["optim.lr"], "override 'optim.lr': expected section.key=value"),
    ({}, ["optimizer.lr=1"], "unknown section 'optimizer' — did you mean 'optim'?"),
])
@pytest.mark.parametrize("command", ["train", "check"])
def test_bad_recipe_exits_2_with_one_line(tmp_path, content, args, message, command):
    recipe = write_recipe(tmp_path / "bad.yaml", content)
    result = run_cli(command, str(recipe), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_and_bad_yaml_exit_2(tmp_path):
    assert run_cli("check", str(tmp_path / "nope.yaml")).returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    result = run_cli("check", str(bad))
    assert result.returncode == 2 and "invalid YAML" in result.stderr


def test_resolved_config_round_trips():
    cfg = build_config({"optim": {"betas": [0.8, 0.9]}})
    again = build_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("optim, train, message", [
    ({"schedule": "wsd"}, {}, r"^optim.schedule=wsd needs optim.decay_steps > 0 \(got None\)"),
    ({"schedule": "wsd", "decay_steps": 80, "warmup_steps": 30}, {"max_steps": 100},
     r"^optim.warmup_steps \+ optim.decay_steps = 30 \+ 80 exceeds train.max_steps=100"),
    ({"decay_steps": 10}, {}, r"^optim.decay_steps is a wsd setting but optim.schedule=cosine"),
    ({"schedule": "wsd", "decay_steps": 10, "decay_shape": "exp"}, {}, r"optim.decay_shape"),
])
def test_wsd_settings_are_checked(optim, train, message):
    with pytest.raises(ConfigError, match=message):
        validate(build_config({"optim": optim, "train": train}))


@pytest.mark.parametrize("sections, message", [
    ({"optim": {"ema_decay": 1.0}}, r"^optim.ema_decay=1.0 must be in \(0, 1\), e.g. 0.999$"),
    ({"optim": {"ema_decay": 0.9, "ema_start_step": -1}}, r"^optim.ema_start_step=-1 must be >= 0$"),
    ({"eval": {"use_ema": True}}, r"^eval.use_ema needs optim.ema_decay"),
])
def test_ema_settings_are_checked(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate(build_config(sections))


@pytest.mark.parametrize("sections, message", [
    ({"eval": {"tasks": "hellaswag"}}, r"^recipe: eval.tasks must be list of str, got 'hellaswag'"),
    ({"eval": {"tasks_limit": 5}}, r"^eval.tasks_limit applies to eval.tasks, which is empty"),
    ({"eval": {"tasks": ["hellaswag"]}, "task": {"name": "masked_lm"}, "model": {"arch": "encoder"}},
     r"^eval.tasks scores a decoder language model .* model.arch=encoder with task.name=masked_lm"),
    ({"eval": {"tasks": ["hellaswag"], "tasks_limit": 0}}, r"^eval.tasks_limit=0 must be at least 1"),
    ({"eval": {"tasks": ["hellaswag"], "tasks_num_fewshot": -1}}, r"^eval.tasks_num_fewshot=-1 must be >= 0"),
    ({"eval": {"tasks": ["hellaswag"], "tasks_include_path": "/no/such/dir"}},
     r"^eval.tasks_include_path: no such folder '/no/such/dir'"),
])
def test_eval_tasks_settings_are_checked(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate(build_config(sections))


def test_eval_tasks_is_a_list_of_any_length():
    cfg = build_config({"eval": {"tasks": ["hellaswag", "arc_easy", "piqa"]}})
    validate(cfg)
    assert cfg.eval.tasks == ("hellaswag", "arc_easy", "piqa") and build_config({}).eval.tasks == ()
    assert build_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("task, message", [
    ({"name": "distill"}, r"^task.name=distill needs task.teacher"),
    ({"name": "causal_lm", "teacher": "runs/big"}, r"^task.teacher is for task.name distill or distill_classification"),
    ({"name": "distill", "teacher": "runs/big", "alpha": 1.5}, r"^task.alpha=1.5 must be in \[0, 1\]$"),
    ({"name": "distill", "teacher": "runs/big", "temperature": 0}, r"^task.temperature=0.0 must be > 0$"),
    ({"name": "distill", "teacher": "runs/big", "loss_chunk_tokens": 64}, r"^task.loss_chunk_tokens chunks"),
])
def test_distill_settings_are_checked(task, message):
    with pytest.raises(ConfigError, match=message):
        validate(build_config({"task": task}))


def test_distill_tasks_read_their_students_data():
    assert build_config({"task": {"name": "distill"}}).task.data_task == "causal_lm"
    assert build_config({"task": {"name": "distill_classification"}}).task.data_task == "classification"
    assert build_config({"task": {"name": "sft"}}).task.data_task == "sft"


def test_a_mapping_key_takes_field_overrides(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"preset": "debug"}})
    cfg = load_config(recipe, ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[qkv]"])
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets) == (8, 16.0, ("qkv",))
    with_lora = write_recipe(tmp_path / "l.yaml", {"model": {"lora": {"rank": 4, "dropout": 0.1}}})
    assert load_config(with_lora, ["model.lora.rank=2"]).model.lora.dropout == 0.1  # the other fields kept
    with pytest.raises(ConfigError, match=r"unknown key 'rnk' in model.lora — one of: rank, alpha"):
        load_config(recipe, ["model.lora.rnk=8"])
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps.x=1': train.max_steps is not a mapping"):
        load_config(write_recipe(tmp_path / "t.yaml", {"train": {"max_steps": 5}}), ["train.max_steps.x=1"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(recipe, ["model.lora.rank.x=1"])
