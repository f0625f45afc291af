"""Tests for bigtrain/checkpoint/lease.py: one training job per run dir (owner.json), with real processes as the holders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bigtrain import checkpoint
from bigtrain.checkpoint import Checkpointer, TrainState
from bigtrain.config import Config, dump_yaml
from bigtrain.core.errors import UserError
from bigtrain.checkpoint.lease import LEASE_FILE, RunDirLease
from tests.conftest import REPO, tiny_recipe, write_recipe
from tests.unit.test_strategy import make_engine

HOLD = ("import sys, time\nfrom bigtrain.checkpoint.lease import RunDirLease\n"
        "lease = RunDirLease(sys.argv[1], float(sys.argv[2]))\nlease.acquire()\nlease.start_renewing()\n"
        "print('held', flush=True)\ntime.sleep(600)\n")


def hold_lease(run_dir, timeout_s: float, job: str) -> subprocess.Popen:
    """A live holder: another process (job id `job`) that took the run dir's lease and renews it."""
    env = {**os.environ, "SLURM_JOB_ID": job, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(timeout_s)], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    return holder


def plant(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LEASE_FILE).write_text(json.dumps({"token": "theirs", "renewed_at": time.time(), **holder}))


def test_training_start_beside_a_live_owner_exits_2_naming_it(tmp_path, cache_dir, capsys):
    from bigtrain.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
    run_dir = tmp_path / "runs/tiny"
    holder = hold_lease(run_dir, 30, job="4711")
    try:
        code = main(["train", str(recipe)])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"bigtrain: error: run dir {run_dir} is in use by host {socket.gethostname()} "
                           f"pid {holder.pid}, job 4711 (its lease"), last
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()  # nothing written


def test_stale_lease_and_one_whose_process_on_this_host_is_gone_are_taken_over(tmp_path, monkeypatch):
    lines = []
    plant(tmp_path, host="node-that-died", pid=1, job_id="77", renewed_at=time.time() - 100)
    RunDirLease(tmp_path, 60, log=lines.append).acquire()
    assert lines == ["bigtrain: took over the run dir from host node-that-died pid 1, job 77: not renewed for "
                     "100 s (checkpoint.lease_timeout_s=60)"]
    assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # this host, its process gone (the job crashed, or hung and exited 3)
    plant(tmp_path, host=socket.gethostname(), pid=int(gone.stdout), job_id="77")
    lines.clear()
    RunDirLease(tmp_path, 60, log=lines.append).acquire()
    assert lines == [f"bigtrain: took over the run dir from host {socket.gethostname()} pid {gone.stdout.strip()}, "
                     f"job 77: its process is gone (a crash or a hang's exit: it can write nothing more)"]

    plant(tmp_path, host=socket.gethostname(), pid=os.getppid(), job_id="77")  # its process lives: not taken
    with pytest.raises(UserError, match=f"in use by host {socket.gethostname()} pid {os.getppid()}, job 77"):
        RunDirLease(tmp_path, 60).acquire()


def test_lease_of_this_job_on_another_host_is_waited_on_until_stale(tmp_path, monkeypatch):
    """A requeued job whose old node may live on: it waits for that node's lease to go stale, then takes it."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    plant(tmp_path, host="old-node", pid=9, job_id="77", renewed_at=time.time() - 0.7)
    lines = []
    started = time.monotonic()
    RunDirLease(tmp_path, 1.0, log=lines.append, poll_s=0.1).acquire()
    assert 0.2 < time.monotonic() - started < 1.5
    assert lines[0].startswith("bigtrain: ") and "is held by host old-node pid 9, job 77 of this same job" in lines[0]
    assert lines[1].startswith("bigtrain: took over the run dir from host old-node pid 9, job 77: not renewed for")


def test_lease_is_renewed_while_held_and_released_only_if_still_ours(tmp_path):
    lease = RunDirLease(tmp_path, 0.5)
    lease.acquire()
    first = json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"]
    lease.start_renewing()
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"] > first
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()

    lost = RunDirLease(tmp_path, 60)
    lost.acquire()
    plant(tmp_path, host="elsewhere", pid=5)
    lost.release()  # the new owner's lease stays
    assert json.loads((tmp_path / LEASE_FILE).read_text())["host"] == "elsewhere"


def test_save_after_the_lease_is_taken_over_stops_before_writing_or_deleting(tmp_path):
    engine = make_engine("fp32")
    lease = RunDirLease(tmp_path, 60)
    lease.acquire()
    saver = Checkpointer(tmp_path, engine, engine.dist, config_yaml=dump_yaml(Config()), keep_last=1,
                         async_save=False, lease=lease)
    saver.save(TrainState(step=1))
    plant(tmp_path, host="new-node", pid=4242, job_id="9")  # another job took the run dir over
    with pytest.raises(UserError, match=f"run dir {tmp_path} was taken over by host new-node pid 4242, job 9"):
        saver.save(TrainState(step=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]  # no temp folder either
    checkpoint.verify(tmp_path / "checkpoints/step-0000001")


@pytest.mark.slow  # a training run watched from outside
def test_stale_lease_is_taken_over_and_a_run_whose_lease_is_stolen_stops_at_its_next_save(tmp_path, cache_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
    run_dir = tmp_path / "runs/tiny"
    plant(run_dir, host="node-that-died", pid=1, job_id="old", renewed_at=time.time() - 3600)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    run = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(recipe), "train.max_steps=400",
                            "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.lease_timeout_s=2",
                            "logging.every=50"], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints/step-0000003").exists():
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before its third checkpoint"
            time.sleep(0.05)
        owner = json.loads((run_dir / LEASE_FILE).read_text())
        assert owner["pid"] == run.pid and owner["token"] != "theirs"
        stolen = run_dir / ".owner.json.thief"
        stolen.write_text(json.dumps({"host": "new-node", "pid": 4242, "job_id": "new", "token": "thief",
                                      "renewed_at": time.time() + 3600}))
        os.replace(stolen, run_dir / LEASE_FILE)
        at_steal = checkpoint.list_checkpoints(run_dir)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2, err
    assert "took over the run dir from host node-that-died pid 1, job old: not renewed for" in err
    assert err.strip().splitlines()[-1].startswith(f"bigtrain: error: run dir {run_dir} was taken over by host "
                                                   f"new-node pid 4242, job new")
    after = checkpoint.list_checkpoints(run_dir)
    # At most the one save already past its check when the lease changed hands completes (and prunes one);
    # nothing after it: the run stopped long before its 400 steps, the thief's lease untouched.
    assert len(set(after) - set(at_steal)) <= 1 and len(set(at_steal) - set(after)) <= 1, (at_steal, after)
    assert int(after[-1].name[5:]) <= int(at_steal[-1].name[5:]) + 1
    assert json.loads((run_dir / LEASE_FILE).read_text())["token"] == "thief"
