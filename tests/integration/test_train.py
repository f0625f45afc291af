"""`bigtrain train` end to end, driven through the CLI like a user: loss, resume, accumulation,
metrics, checkpoints and their damage, wandb offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigtrain import checkpoint
from tests.conftest import run_cli, tiny_recipe, write_recipe


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/loss" in r], [r for r in records if "eval/loss" in r]


def train(tmp_path: Path, cache_dir: Path, *overrides: str, name: str = "tiny", **sections):
    recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(cache_dir, tmp_path / "runs", **sections))
    result = run_cli("train", str(recipe), f"run.name={name}", *overrides)
    return result, tmp_path / "runs" / name


def test_train_lowers_loss_and_writes_run_dir(tmp_path, cache_dir):
    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=40", "eval.every=20", "checkpoint.every=20",
                            "logging.curves=true")
    assert result.returncode == 0, result.stderr
    records, evals = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["train/loss"], sum(r["train/loss"] for r in records[-5:]) / 5
    assert last < first - 0.5, (first, last)  # from ~6.2 (ln 512): seen 6.23 → 5.37
    assert [e["step"] for e in evals] == [20, 40] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[1]["eval/ppl"] == pytest.approx(math.exp(evals[1]["eval/loss"]))
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "precision.json").read_text())["compute"] == "float32"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the evals and at the end


def test_metrics_keys_tokens_per_sec_and_mfu_match_hand_calculation(tmp_path, cache_dir):
    from bigtrain.core.hardware import peak_flops_per_sec

    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    records, evals = read_metrics(run_dir)
    keys = {"step", "train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "perf/tokens_per_sec",
            "perf/mfu", "perf/step_time_s", "perf/data_wait_frac", "perf/max_memory_gb"}
    assert all(keys <= r.keys() for r in records)
    assert {"eval/loss", "eval/ppl"} <= evals[-1].keys()
    # Hand calculation: debug preset (2 layers, d 64, d_ff 256, tied), vocab 512, seq 32, 8 sequences per step.
    layers, d, d_ff, vocab, seq = 2, 64, 256, 512, 32
    n_matmul = layers * (3 * d * d + d * d + 2 * d * d_ff) + d * vocab
    flops_per_token = 6 * n_matmul + 12 * layers * d * seq
    peak = peak_flops_per_sec(torch.device("cpu"), torch.float32)
    for r in records:
        tokens_per_sec = 8 * seq / r["perf/step_time_s"]  # packed: every token is a target
        assert r["perf/tokens_per_sec"] == pytest.approx(tokens_per_sec, rel=1e-6)
        assert r["perf/mfu"] == pytest.approx(flops_per_token * tokens_per_sec / peak, rel=1e-6)
        assert 0 <= r["perf/data_wait_frac"] < 1 and r["perf/max_memory_gb"] > 0


@pytest.mark.slow  # runs in sequence
def test_exact_resume_is_bitwise_and_a_wsd_run_extends_from_its_stable_phase(tmp_path, cache_dir):
    """The first half is a 6-step WSD run stopped at step 4, still in its stable phase; resumed with
    max_steps=8, it decays later and equals a straight 8-step run bit for bit. The straight run saves
    synchronously, the other in the background (the default): every checkpoint's tensor files are the same bytes,
    the EMA of the weights (ema.pt) included. Eval uses the EMA (eval.use_ema), as `bigtrain eval` and
    `export --ema` do."""
    common = ("checkpoint.every=2", "optim.warmup_steps=3", "eval.every=4", "optim.schedule=wsd", "optim.decay_steps=2",
              "optim.ema_decay=0.7", "optim.ema_start_step=3", "eval.use_ema=true")
    straight, straight_dir = train(tmp_path, cache_dir, *common, "train.max_steps=8", "checkpoint.async_save=false",
                                   name="straight")
    assert straight.returncode == 0, straight.stderr
    half, resumed_dir = train(tmp_path, cache_dir, *common, "train.max_steps=6", "train.stop_at_step=4", name="resumed")
    assert half.returncode == 0, half.stderr
    assert read_metrics(resumed_dir)[0][-1]["step"] == 4
    rest, _ = train(tmp_path, cache_dir, *common, "train.max_steps=8", name="resumed")
    assert rest.returncode == 0, rest.stderr
    assert "resuming at step 4" in rest.stderr

    a, a_eval = read_metrics(straight_dir)
    b, b_eval = read_metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_consumed"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bit for bit
    assert [r["train/lr"] for r in a] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 3e-3, 3e-3 * (0.1 + 0.9 * (1 - 0.5 ** 0.5)), 3e-4])
    assert [e["eval/loss"] for e in a_eval] == [e["eval/loss"] for e in b_eval]
    wa = torch.load(straight_dir / "checkpoints/step-0000008/model.pt", weights_only=True)
    wb = torch.load(resumed_dir / "checkpoints/step-0000008/model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [p.name for p in checkpoint.list_checkpoints(straight_dir)]
    assert steps == [p.name for p in checkpoint.list_checkpoints(resumed_dir)] == [f"step-{s:07d}" for s in (2, 4, 6, 8)]
    assert not list((resumed_dir / "checkpoints").glob(".*"))  # no temp folder left behind
    for step in steps:
        checkpoint.verify(resumed_dir / "checkpoints" / step)
        for name in ("model.pt", "optimizer.pt", "ema.pt"):
            assert ((straight_dir / "checkpoints" / step / name).read_bytes()
                    == (resumed_dir / "checkpoints" / step / name).read_bytes()), (step, name)

    # The in-loop eval at step 8 scored the EMA weights: `bigtrain eval` of that checkpoint with eval.use_ema
    # gives the same loss, and a different one without.
    scores = {}
    for use in ("true", "false"):
        result = run_cli("eval", str(straight_dir), f"eval.use_ema={use}")
        assert result.returncode == 0, result.stderr
        scores[use] = json.loads(result.stdout.strip().splitlines()[-1])["eval/loss"]
    assert scores["true"] == pytest.approx(a_eval[-1]["eval/loss"], rel=1e-6)
    assert abs(scores["false"] - scores["true"]) > 1e-4
    exported = run_cli("export", str(straight_dir), str(tmp_path / "ema-export"), "--ema")
    assert exported.returncode == 0, exported.stderr
    ema = torch.load(straight_dir / "checkpoints/step-0000008/ema.pt", weights_only=True)
    assert load_file(tmp_path / "ema-export/model.safetensors").keys() == ema.keys()
    assert all(torch.equal(t, ema[k]) for k, t in load_file(tmp_path / "ema-export/model.safetensors").items())


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_accumulation_invariance_logged_loss_and_lr(tmp_path, cache_dir, ragged_corpus, packing):
    data = () if packing else ("data.packing=false", f"data.source={ragged_corpus}")
    runs = {}
    for micro in (8, 2, 1):
        result, run_dir = train(tmp_path, cache_dir, "train.max_steps=3", f"train.micro_batch_size={micro}",
                                *data, name=f"micro{micro}")
        assert result.returncode == 0, result.stderr
        runs[micro] = read_metrics(run_dir)[0]
    for micro in (2, 1):
        for ra, rb in zip(runs[8], runs[micro]):
            assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-6)
            assert rb["train/lr"] == ra["train/lr"]
    assert runs[8][-1]["train/lr"] == pytest.approx(3e-3 * 0.1)  # final value exactly at max_steps


def test_keep_last_prunes_old_checkpoints_and_leaves_no_temp_folders(tmp_path, cache_dir):
    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    manifest = json.loads((run_dir / "checkpoints/step-0000006/manifest.json").read_text())
    assert manifest["samples_consumed"] == 48
    assert {"model.pt", "optimizer.pt", "trainer.json", "config.yaml", "rng/rank-00000.pt"} <= manifest["files"].keys()


@pytest.mark.slow  # runs in sequence
def test_corrupted_checkpoint_is_named_and_auto_falls_back(tmp_path, cache_dir):
    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=6", "checkpoint.every=2")
    assert result.returncode == 0, result.stderr
    damaged = run_dir / "checkpoints/step-0000006/model.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    explicit, _ = train(tmp_path, cache_dir, "train.max_steps=8", f"checkpoint.resume={damaged.parent}")
    assert explicit.returncode == 2
    assert f"corrupted checkpoint file {damaged}" in explicit.stderr.strip().splitlines()[-1]

    truncated = run_dir / "checkpoints/step-0000004/optimizer.pt"
    truncated.write_bytes(truncated.read_bytes()[:100])
    check = run_cli("verify", str(run_dir))  # on demand: every checkpoint, every byte
    assert check.returncode == 2
    lines = check.stdout.splitlines()[1:]  # after the data cache's line
    assert check.stdout.startswith("ok       data ")
    assert lines[0].startswith(f"ok       {run_dir / 'checkpoints/step-0000002'} (")
    assert lines[1] == f"damaged  {truncated.parent}: truncated checkpoint file {truncated}: 100 bytes, manifest says " \
                       f"{json.loads((truncated.parent / 'manifest.json').read_text())['files']['optimizer.pt']['bytes']}"
    assert lines[2].startswith(f"damaged  {damaged.parent}: corrupted checkpoint file {damaged}")
    assert check.stderr.strip().endswith(f"2 damaged in '{run_dir}' (listed above)")
    auto, _ = train(tmp_path, cache_dir, "train.max_steps=8")
    assert auto.returncode == 0, auto.stderr
    assert str(damaged) in auto.stderr and str(truncated) in auto.stderr
    assert "resuming at step 2" in auto.stderr
    steps = [r["step"] for r in read_metrics(run_dir)[0]]
    assert steps == list(range(1, 9))  # steps after the checkpoint were dropped and redone, no repeats
    [aside] = run_dir.glob("metrics.set-aside-*.jsonl")  # ... and the lines dropped are kept
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()
            if "train/loss" in line] == list(range(1, 7))
    assert f"the whole earlier file is kept as {aside}" in auto.stderr

    # Every checkpoint damaged: no silent start from step 0 (which would also throw the run's history away).
    logged = (run_dir / "metrics.jsonl").read_text()
    folders = checkpoint.list_checkpoints(run_dir)
    for folder in folders:
        with open(folder / "model.pt", "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff\xff\xff")
    none_good, _ = train(tmp_path, cache_dir, "train.max_steps=10")
    assert none_good.returncode == 2
    last = none_good.stderr.strip().splitlines()[-1]
    assert last.startswith("bigtrain: error: no complete checkpoint in ") and "checkpoint.resume=none" in last
    assert all(folder.name in last for folder in folders), last
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == [f.name for f in folders]  # all still there
    assert (run_dir / "metrics.jsonl").read_text() == logged and len(list(run_dir.glob("metrics.set-aside-*"))) == 1


def test_corrupted_shard_is_named(tmp_path):
    """The first run checksums the prepared data; later starts check sizes, `bigtrain verify` every byte."""
    cache = tmp_path / "cache"
    ok, first_dir = train(tmp_path, cache, "train.max_steps=2", name="first")
    assert ok.returncode == 0, ok.stderr
    shard = next(cache.glob("*/train/tokens-00000.bin"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    check = run_cli("verify", str(first_dir))
    assert check.returncode == 2 and f"damaged  data {shard.parent.parent}: corrupted shard {shard}" in check.stdout
    recipe = str(first_dir / "config.yaml")
    assert run_cli("prepare", recipe).returncode == 0  # verified once already: sizes and index only (a job start)
    again = run_cli("prepare", recipe, "--verify")  # every byte, on demand
    assert again.returncode == 2 and f"corrupted shard {shard}" in again.stderr.strip().splitlines()[-1]
    shard.write_bytes(bytes(data[:-2]))
    bad, run_dir = train(tmp_path, cache, "train.max_steps=2", name="second")
    assert bad.returncode == 2
    assert str(shard) in bad.stderr.strip().splitlines()[-1]
    assert not (run_dir / "checkpoints").exists()


def test_wandb_offline_run_holds_history_and_resume_keeps_id(tmp_path, cache_dir):
    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=4", "train.stop_at_step=2", "logging.wandb=offline")
    assert result.returncode == 0, result.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = runs[0].name.rsplit("-", 1)[-1]
    assert json.loads((run_dir / "checkpoints/step-0000002/trainer.json").read_text())["wandb_run_id"] == run_id
    history = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in history and b"perf/mfu" in history

    again, _ = train(tmp_path, cache_dir, "train.max_steps=4", "logging.wandb=offline")
    assert again.returncode == 0, again.stderr
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {run_id}


def test_fp16_trains_tiny_model_with_loss_scaling(tmp_path, cache_dir):
    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=6", "parallel.precision=fp16")
    assert result.returncode == 0, result.stderr
    records, _ = read_metrics(run_dir)
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert all(r["train/loss_scale"] > 0 for r in records)
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert json.loads((run_dir / "precision.json").read_text())["compute"] == "float16"
    assert (run_dir / "checkpoints/step-0000006/scaler.pt").is_file()


def test_prepare_and_bench_commands(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
    prepared = run_cli("prepare", str(recipe))
    assert prepared.returncode == 0, prepared.stderr
    assert "train" in prepared.stdout and "tokens" in prepared.stdout
    bench = run_cli("bench", str(recipe), "--steps", "3", "--warmup", "1")
    assert bench.returncode == 0, bench.stderr
    for word in ("tokens/s", "MFU", "forward+backward", "optimizer", "waiting for data"):
        assert word in bench.stdout
    assert not (tmp_path / "runs").exists()  # bench leaves no run dir behind


@pytest.mark.slow
def test_compile_and_activation_checkpointing_train_like_eager(tmp_path, cache_dir):
    """Two compiled runs share one kernel cache folder, the second with torch capped at AVX2 (as on
    an AVX2-only node): inductor's cache key omits the CPU ISA, and a shared folder gave NaN losses."""
    eager, eager_dir = train(tmp_path, cache_dir, "train.max_steps=3", name="eager")
    assert eager.returncode == 0, eager.stderr
    inductor_cache = tmp_path / "inductor"
    runs = {}
    for name, capability in (("compiled", {}), ("compiled-avx2", {"ATEN_CPU_CAPABILITY": "avx2"})):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
        result = run_cli("train", str(recipe), f"run.name={name}", "train.max_steps=3", "parallel.compile=true",
                         "parallel.activation_checkpointing=true",
                         env={"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache), **capability})
        assert result.returncode == 0, result.stderr
        runs[name] = tmp_path / "runs" / name
    for name, compiled_dir in runs.items():
        for a, b in zip(read_metrics(eager_dir)[0], read_metrics(compiled_dir)[0], strict=True):
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), name
    assert (inductor_cache / "cpu-avx2").is_dir()
    # State-dict keys are unchanged by the wrappers, so checkpoints move between the two settings.
    keys = torch.load(runs["compiled"] / "checkpoints/step-0000003/model.pt", weights_only=True).keys()
    assert keys == torch.load(eager_dir / "checkpoints/step-0000003/model.pt", weights_only=True).keys()


def test_empty_validation_split_warns_once_and_logs_no_eval(tmp_path, cache_dir, capsys):
    """An empty validation split would log eval/loss 0 and eval/ppl 1: no eval records, one warning; `bigtrain eval`
    of the run is one line saying so, exit 2, no eval report."""
    from bigtrain.cli import main

    result, run_dir = train(tmp_path, cache_dir, "train.max_steps=4", "eval.every=2", "data.validation_split=0")
    assert result.returncode == 0, result.stderr
    records, evals = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and evals == []
    assert not any("eval/" in key for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   for key in json.loads(line))
    assert result.stderr.count("warning: the validation split is empty") == 1
    assert main(["eval", str(run_dir)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"bigtrain: error: eval: the validation split of {run_dir} is empty (data.validation_split=0.0 held "
                    f"out no document) — nothing to score; hold documents out when training (validation_split > 0)")
    assert not (run_dir / "eval").exists()


def test_document_mask_trains_through_the_cli_and_changes_what_is_predicted(tmp_path, cache_dir):
    """data.document_mask through `bigtrain train` (with activation checkpointing, whose wrapper passes the mask
    and positions on): it trains, and its first loss differs from the unmasked run's (documents apart)."""
    first = {}
    for mask in ("false", "true"):
        result, run_dir = train(tmp_path, cache_dir, "train.max_steps=3", f"data.document_mask={mask}",
                                "parallel.activation_checkpointing=true", name=f"mask-{mask}")
        assert result.returncode == 0, result.stderr
        records, evals = read_metrics(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3] and math.isfinite(evals[-1]["eval/loss"])
        first[mask] = records[0]["train/loss"]
    assert first["true"] != pytest.approx(first["false"], rel=1e-4)
    bad, _ = train(tmp_path, cache_dir, "data.document_mask=true", "data.packing=false", name="bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "bigtrain: error: data.document_mask keeps packed documents apart for task.name=causal_lm with data.packing=true")
