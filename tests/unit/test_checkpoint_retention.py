"""Tests for bigtrain/checkpoint/store.py and resume.py: retention and the resume choice: which checkpoints `keep_last` keeps, in what
order steps sort, what a damaged or vanished checkpoint does to a resume."""

from __future__ import annotations

import pytest

from bigtrain import checkpoint
from bigtrain.checkpoint import CheckpointError, Checkpointer, TrainState, VerifiedCheckpoints
from bigtrain.config import Config, dump_yaml
from tests.unit.test_strategy import make_engine


def flip_a_byte(path) -> None:
    """Damage a file in place, its size unchanged (what a bad disk or a stray write does)."""
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def steps(run_dir) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(run_dir)]


def test_steps_sort_by_number_past_seven_digits_and_prune_keeps_the_newest(tmp_path):
    engine = make_engine("fp32")
    for step in (9_999_999, 10_000_000):
        checkpoint.save(tmp_path, TrainState(step=step), engine, engine.dist, config_yaml=dump_yaml(Config()),
                        keep_last=1)
    assert steps(tmp_path) == ["step-10000000"]
    (tmp_path / "checkpoints/step-9999999").mkdir()  # listed in step order, not name order
    assert steps(tmp_path) == ["step-9999999", "step-10000000"]
    (tmp_path / "checkpoints/step-9999999").rmdir()
    assert checkpoint.find_resume_checkpoint("auto", tmp_path).name == "step-10000000"


def test_keep_last_counts_only_verified_checkpoints_and_leaves_damaged_ones(tmp_path, capsys):
    """A damaged checkpoint neither counts toward keep_last (so the good one a resume needs stays) nor is deleted
    (named in one warning per process). A checkpoint this process published is not read back; one from an
    earlier process is read once."""
    engine = make_engine("fp32")
    yaml = dump_yaml(Config())
    for step in (1, 2):  # an earlier process
        checkpoint.save(tmp_path, TrainState(step=step), engine, engine.dist, config_yaml=yaml, keep_last=2)
    flip_a_byte(tmp_path / "checkpoints/step-0000002/model.pt")

    saver = Checkpointer(tmp_path, engine, engine.dist, config_yaml=yaml, keep_last=2, async_save=False)
    saver.save(TrainState(step=3))
    assert steps(tmp_path) == ["step-0000001", "step-0000002", "step-0000003"]  # 1 and 3 are the two good ones
    warned = capsys.readouterr().err
    assert warned.count("\n") == 1 and "corrupted checkpoint file" in warned and "step-0000002/model.pt" in warned
    assert "not counted toward checkpoint.keep_last" in warned
    saver.save(TrainState(step=4))
    assert steps(tmp_path) == ["step-0000002", "step-0000003", "step-0000004"]
    assert capsys.readouterr().err == ""  # warned once

    flip_a_byte(tmp_path / "checkpoints/step-0000004/model.pt")  # behind the back of the process that wrote it
    saver.save(TrainState(step=5))
    assert steps(tmp_path) == ["step-0000002", "step-0000004", "step-0000005"]  # 4 was not read back: still good
    checkpoint.prune(tmp_path, 2, VerifiedCheckpoints())  # a new process reads it, and keeps it as damaged
    assert steps(tmp_path) == ["step-0000002", "step-0000004", "step-0000005"]
    assert "step-0000004/model.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        checkpoint.verify(tmp_path / "checkpoints/step-0000004")


def test_a_file_missing_at_load_is_a_one_line_error(tmp_path):
    """A checkpoint file that is gone when the engine loads it (the manifest no longer names it, as if another job
    pruned the folder between verify and load): one line naming the checkpoint and the file, exit 2."""
    import json

    engine = make_engine("fp32")
    folder = checkpoint.save(tmp_path, TrainState(step=1), engine, engine.dist, config_yaml=dump_yaml(Config()),
                             keep_last=0)
    (folder / "optimizer.pt").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["optimizer.pt"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"checkpoint {folder}: .*optimizer.pt is missing"):
        checkpoint.resume("auto", tmp_path, make_engine("fp32"), engine.dist)


def test_a_dcp_shard_missing_at_load_is_recognised(tmp_path):
    """DCP reports a rank's missing file inside its own CheckpointException (a BaseException): still named."""
    import torch
    import torch.distributed.checkpoint as dcp

    from bigtrain.checkpoint.resume import _missing_file

    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path), no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    shard.unlink()
    with pytest.raises(BaseException) as caught:
        dcp.load({"w": torch.zeros(4)}, checkpoint_id=str(tmp_path), no_dist=True)
    assert _missing_file(caught.value) is not None and shard.name in _missing_file(caught.value)
    assert _missing_file(RuntimeError("something else")) is None
