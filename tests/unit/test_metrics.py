"""Tests for bigtrain/metrics/ (sinks, progress, throughput): metrics.jsonl, progress lines, wandb (offline only), MFU, timers."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bigtrain.metrics import MetricsLogger, PeakMemory, StepTimer, mfu, sinks


@dataclass
class LoggingConfig:  # duck-typed stand-in for bigtrain.config.LoggingConfig
    every: int = 10
    wandb: str = "disabled"
    wandb_project: str = "bigtrain-tests"
    wandb_entity: str | None = None
    progress: bool = True


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    """Keep wandb offline, quiet and inside tmp_path: no home netrc, no API key, no network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    return home


def make_logger(run_dir, cfg=None, **kwargs):
    kwargs = {"enabled": True, "run_name": "test", "config": {"lr": 1e-3}, "total_steps": 100, **kwargs}
    return MetricsLogger(cfg or LoggingConfig(), run_dir, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_wandb_history(run_file: Path) -> list[dict]:
    """History rows of a `.wandb` file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data, block_size = run_file.read_bytes(), 32768
    if not data.startswith(b":W&B"):  # not created yet (or a format this reader does not know)
        return []
    pos, payload, records = 7, b"", []
    while pos + 7 <= len(data):
        if block_size - pos % block_size < 7:  # block trailer padding
            pos += block_size - pos % block_size
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            records.append(payload)
            payload = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wait_for_wandb_history(run_file: Path, rows: int, timeout_s: float = 20.0) -> list[dict]:
    """wandb-core writes the file in its own process and may finish just after run.finish()."""
    deadline = time.monotonic() + timeout_s
    while len(history := read_wandb_history(run_file)) < rows and time.monotonic() < deadline:
        time.sleep(0.05)
    return history


def offline_run_dirs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


# -- metrics.jsonl ------------------------------------------------------------------------------


def test_log_appends_one_json_line_per_call(tmp_path):
    with make_logger(tmp_path) as logger:
        logger.log(10, {"train/loss": 2.5, "train/lr": torch.tensor(3e-4)})
        logger.log(20, {"train/loss": 2.25, "train/skipped_steps": 0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 10, "train/loss": 2.5, "train/lr": pytest.approx(3e-4)},
        {"step": 20, "train/loss": 2.25, "train/skipped_steps": 0},
    ]


def test_resume_drops_lines_after_start_step_then_appends_and_keeps_the_old_file_whole(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 10.0 - s}) for s in (10, 20, 30, 40)]
    before = "\n".join(lines) + '\n{"step": 50, "train/lo'  # killed mid-line
    path.write_text(before)
    with make_logger(tmp_path, LoggingConfig(progress=False), start_step=20) as logger:
        logger.log(30, {"train/loss": 1.0})
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[1]["train/loss"] == -10.0 and rows[2]["train/loss"] == 1.0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    [aside] = tmp_path.glob("metrics.set-aside-*.jsonl")
    assert aside.read_text() == before  # every line logged, torn one included
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "resuming at step 20" in said and str(aside) in said

    with make_logger(tmp_path, LoggingConfig(progress=False), start_step=30) as logger:  # nothing past 30: no copy
        logger.log(31, {"train/loss": 0.5})
    assert len(list(tmp_path.glob("metrics.set-aside-*.jsonl"))) == 1 and capsys.readouterr().err == ""


def test_fresh_start_of_a_run_dir_that_has_logged_keeps_its_metrics_aside(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    before = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    path.write_text(before)
    with make_logger(tmp_path, LoggingConfig(progress=False), start_step=0) as logger:
        logger.log(1, {"train/loss": 9.0})
    assert read_jsonl(path) == [{"step": 1, "train/loss": 9.0}]
    [aside] = tmp_path.glob("metrics.set-aside-*.jsonl")
    assert aside.read_text() == before
    assert f"its metrics.jsonl is kept as {aside}" in capsys.readouterr().err
    with make_logger(tmp_path, LoggingConfig(progress=False), start_step=0):  # and again: a second copy beside
        pass
    assert sorted(p.read_text() for p in tmp_path.glob("metrics.set-aside-*.jsonl")) == sorted(
        [before, json.dumps({"step": 1, "train/loss": 9.0}) + "\n"])


def test_disabled_logger_writes_and_prints_nothing(tmp_path, capfd):
    run_dir = tmp_path / "run"
    logger = make_logger(run_dir, LoggingConfig(wandb="offline"), enabled=False)
    logger.progress(1, loss=2.0)
    logger.log(1, {"train/loss": 2.0})
    logger.message("eval loss 1.0")
    logger.close()
    logger.close()
    assert not run_dir.exists()
    assert logger.wandb_run_id is None
    assert capfd.readouterr() == ("", "")


# -- console progress --------------------------------------------------------------------------


def test_plain_progress_prints_one_line_per_logging_step(tmp_path, capsys):
    logger = make_logger(tmp_path, total_steps=25)
    for step in range(1, 26):
        logger.progress(step, tokens_per_sec=1000.0)
        if step % 10 == 0:
            logger.log(step, {"train/loss": 3.0 - step / 10, "train/lr": 1e-3, "perf/mfu": 0.25})
            logger.log(step, {"eval/loss": 2.0})  # same step, no progress values: no extra line
    logger.message("eval: loss 2.0000")
    logger.close()
    logger.close()  # idempotent

    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 10/25", "step 20/25", "eval: loss 2.0000", "step 25/25"]
    assert "loss 2.0000" in lines[0] and "lr 1.00e-03" in lines[0] and "MFU 25.0%" in lines[0]
    assert "1,000 tok/s" in lines[0]
    assert "ETA" in lines[1]  # a rate is known after two displayed steps


def test_progress_off_keeps_messages(tmp_path, capsys):
    with make_logger(tmp_path, LoggingConfig(progress=False), total_steps=10) as logger:
        logger.progress(10, loss=1.0)
        logger.log(10, {"train/loss": 1.0})
        logger.message("done")
    assert capsys.readouterr().err == "done\n"


# -- wandb (offline only) ----------------------------------------------------------------------


def test_wandb_offline_records_logged_history(tmp_path, wandb_sandbox):
    with make_logger(tmp_path, LoggingConfig(wandb="offline")) as logger:
        logger.log(10, {"train/loss": 2.5, "train/lr": 1e-3})
        logger.log(20, {"train/loss": 2.0, "train/lr": 5e-4})
        run_id = logger.wandb_run_id
    assert run_id
    (run_dir,) = offline_run_dirs(tmp_path)
    assert run_dir.name.endswith(run_id)
    history = wait_for_wandb_history(run_dir / f"run-{run_id}.wandb", rows=2)
    assert [(row["_step"], row["train/loss"], row["train/lr"]) for row in history] == [
        (10, 2.5, 1e-3),
        (20, 2.0, 5e-4),
    ]


def test_wandb_resume_continues_the_same_run_id(tmp_path, wandb_sandbox):
    with make_logger(tmp_path, LoggingConfig(wandb="offline")) as first:
        first.log(10, {"train/loss": 2.5})
        run_id = first.wandb_run_id
    with make_logger(tmp_path, LoggingConfig(wandb="offline"), start_step=10, wandb_run_id=run_id) as second:
        second.log(20, {"train/loss": 2.0})
        assert second.wandb_run_id == run_id
    dirs = offline_run_dirs(tmp_path)  # one per process lifetime, both named after the run id
    assert len(dirs) == 2 and all(run_id in d.name for d in dirs)
    steps = [row["_step"] for d in dirs for row in wait_for_wandb_history(d / f"run-{run_id}.wandb", rows=1)]
    assert sorted(steps) == [10, 20]


def test_wandb_online_without_api_key_falls_back_to_offline(tmp_path, wandb_sandbox, capsys):
    with make_logger(tmp_path, LoggingConfig(wandb="online")) as logger:
        logger.log(1, {"train/loss": 1.0})
    assert capsys.readouterr().err.count("no API key") == 1
    assert len(offline_run_dirs(tmp_path)) == 1


def test_api_key_detection_reads_env_and_netrc(wandb_sandbox, monkeypatch):
    assert not sinks._have_wandb_api_key()
    (wandb_sandbox / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert sinks._have_wandb_api_key()
    (wandb_sandbox / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert sinks._have_wandb_api_key()


def test_wandb_init_failure_warns_and_logging_continues(tmp_path, wandb_sandbox, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    with make_logger(tmp_path, LoggingConfig(wandb="offline")) as logger:
        logger.log(1, {"train/loss": 1.0})
        logger.progress(2, loss=0.9)
        assert logger.wandb_run_id is None
    assert "wandb failed to start (RuntimeError: wandb is down)" in capsys.readouterr().err
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 1.0}]


def test_wandb_log_failure_warns_once_and_disables_wandb(tmp_path, wandb_sandbox, monkeypatch, capsys):
    import wandb

    class FlakyRun:
        id = "flaky123"
        calls = 0

        def log(self, data, step):
            FlakyRun.calls += 1
            raise ConnectionError("timed out")

        def finish(self):
            raise AssertionError("finish must not be called on a disabled run")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FlakyRun())
    with make_logger(tmp_path, LoggingConfig(wandb="offline")) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"train/loss": 1.0})
    assert FlakyRun.calls == 1
    assert logger.wandb_run_id == "flaky123"  # still the id to resume into
    assert capsys.readouterr().err.count("wandb failed (ConnectionError: timed out)") == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_fresh_process_imports_neither_wandb_nor_rich_when_unused(tmp_path):
    code = (
        "import sys; from pathlib import Path; from bigtrain import metrics\n"
        "class Cfg: every = 10; wandb = 'disabled'; wandb_project = 'p'; wandb_entity = None; progress = True\n"
        f"metrics.MetricsLogger(Cfg(), Path({str(tmp_path)!r}), enabled=True, run_name='r', config={{}},"
        " total_steps=10).close()\n"
        "print(sorted(m for m in ('wandb', 'rich') if m in sys.modules))\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- MFU and peaks -----------------------------------------------------------------------------


def test_mfu_is_achieved_over_peak_flops():
    # 6 * 124M params * 100k tok/s = 74.4 TFLOP/s of 989 TFLOP/s
    assert mfu(6 * 124e6, 100_000, 989e12) == pytest.approx(0.07523, rel=1e-3)
    assert mfu(1.0, 0.0, 1e12) == 0.0


# -- timing and memory -------------------------------------------------------------------------


def test_step_timer_splits_data_wait_from_step_time():
    timer = StepTimer()
    for _ in range(3):
        timer.start_step()
        with timer.data_wait():
            time.sleep(0.02)
        time.sleep(0.02)  # "compute"
        dt = timer.end_step()
        assert dt >= 0.04 and timer.step_time_s == dt
    assert 0.3 < timer.data_wait_frac < 0.7

    window = timer.window()
    assert window["steps"] == 3
    assert window["time_s"] >= 0.12 and window["data_wait_s"] >= 0.06
    assert window["step_time_s"] == pytest.approx(window["time_s"] / 3)
    assert timer.data_wait_frac == 0.0 and timer.window()["steps"] == 0  # reset


def test_peak_memory_counts_what_is_allocated_after_it_starts_on_cpu():
    before = torch.ones(96 * 2**20, dtype=torch.uint8)  # resident before the start: not counted
    peak = PeakMemory(torch.device("cpu"))
    touched = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB resident after it
    del before, touched
    assert 60 * 2**20 <= peak.peak_bytes() < 90 * 2**20  # not the 160 MiB of both
