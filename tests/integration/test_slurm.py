"""`sbatch slurm/pretrain.sh` and `slurm/finetune.sh` on a real one-node Slurm cluster started by
tests/slurm/cluster.sh (slurmctld + slurmd + munge on this host): one process per CPU slot, preemption by
SIGUSR1 (to the step, the batch shell or both) with checkpoint + requeue + resume, a SIGKILL'd job requeued
from its last periodic checkpoint, fine-tuning from the pretrain run; and SIGTERM to a plain `bigtrain train`
without Slurm, in the loop and outside it (resume, init_from, rank 0's data preparation; a second SIGTERM).

Multi-node Slurm semantics (nodelist → master, SLURM_NODEID → node rank) are covered by the launcher's
environment tests (tests/unit/test_launcher.py) and the two-node torchrun simulation (test_launch.py):
this machine's cluster has one node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe
from tests.integration.test_train import read_metrics

pytestmark = pytest.mark.slow

STEPS = 60  # long enough to signal mid-run, short enough for a few seconds of training
EVERY = 10  # periodic checkpoints
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


# --------------------------------------------------------------------------- cluster and job helpers


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster (started here if it is not running); needs root to install and start it."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests start slurmctld/slurmd/munged with tests/slurm/cluster.sh, which needs root")
    result = subprocess.run(["bash", str(REPO / "tests/slurm/cluster.sh")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert shutil.which("sbatch") and shutil.which("scontrol")


def sbatch(script: str, *args: str, log: Path, wait: bool = False) -> str:
    """Submit slurm/SCRIPT on the CPU-only node (2 CPU slots) with this test's environment; returns the job id."""
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10", f"--chdir={REPO}",
           f"--output={log}", *(["--wait"] if wait else []), f"slurm/{script}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    job = result.stdout.strip().split(";")[0]
    assert job.isdigit(), f"sbatch failed ({result.returncode}): {result.stderr}\n{read_log(log)}"
    return job


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job: str, done, *, log: Path, timeout_s: float = 240) -> dict[str, str]:
    """Poll the job until done(info) holds; a requeued job (held back 2 min by Slurm) is made eligible now."""
    deadline, held_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        info = job_info(job)
        if done(info):
            return info
        # Requeued: Reason is None until the scheduler's next pass (tens of seconds), then BeginTime.
        if info.get("JobState") == "PENDING" and info.get("Reason") in ("None", "BeginTime"):
            held_since = held_since or time.monotonic()
            # Only once the node is idle: the first start's batch script may still be finishing, and a new
            # start before it ends gets that script's exit status. And a second after the job was seen held:
            # slurmd compares credential times in whole seconds, and refuses a start in the second the last
            # one ended ("Job credential revoked"), failing the job.
            if node_idle() and time.monotonic() - held_since >= 1:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True)
    raise AssertionError(f"job {job} not done after {timeout_s} s: {job_info(job)}\n{read_log(log)}")


def node_idle() -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return bool(states) and all(state == "idle" for state in states)


def wait_step(run_dir: Path, step: int, job: str, *, log: Path, timeout_s: float = 180) -> int:
    """Poll metrics.jsonl until a training step >= `step` is logged; returns the newest logged step."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [json.loads(line)["step"] for line in (path.read_text().splitlines() if path.exists() else [])
                 if line.endswith("}")]
        if steps and steps[-1] >= step:
            return steps[-1]
        if job and job_info(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged: {job_info(job) if job else ''}\n{read_log(log)}")


def read_log(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else "(no log)"


def losses(run_dir: Path) -> list[float]:
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no gap, no repeated step
    return [r["train/loss"] for r in records]


def wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, cache_dir, slurm_cluster):
    """The tiny pretrain recipe and one uninterrupted `sbatch --wait slurm/pretrain.sh` run of it."""
    tmp = tmp_path_factory.mktemp("slurm")
    recipe = write_recipe(tmp / "pretrain.yaml", tiny_recipe(
        cache_dir, tmp / "runs", train={"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4},
        eval={"every": 30, "max_samples": 8}, checkpoint={"every": EVERY, "keep_last": 0},
        logging={"every": 1, "progress": False, "wandb": "offline"}))
    log = tmp / "straight.log"
    job = sbatch("pretrain.sh", str(recipe), "run.name=straight", log=log, wait=True)
    return recipe, job, log, tmp / "runs" / "straight"


# --------------------------------------------------------------------------- on the cluster


def test_sbatch_pretrain_starts_one_process_per_cpu_slot_and_completes(pretrain):
    recipe, job, log, run_dir = pretrain
    info = job_info(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), read_log(log)
    text = log.read_text()
    assert "ddp × 2 on cpu" in text  # --cpus-per-task=2 on a CPU-only node: two training processes
    prepared = re.search(r"^prepared \S+: vocab \d+ · train [\d,]+ tokens", text, re.M)  # its own step, first
    assert prepared and prepared.start() < text.index("ddp × 2 on cpu"), read_log(log)
    assert f"bigtrain: finished step {STEPS}" in text
    losses(run_dir)
    assert (run_dir / f"checkpoints/step-{STEPS:07d}/manifest.json").is_file()
    assert len(wandb_ids(run_dir)) == 1


# Where the warning signal goes: the training step only (`--signal=USR1@N`, the scripts' default), the batch
# shell as well (`--full`; srun, a child of the shell, passes it on too), or the batch shell only (`--batch`,
# the same as `--signal=B:USR1@N`), which must pass it on to the step. Each gives one checkpoint and one requeue.
@pytest.mark.parametrize("to", ["step", "full", "batch"])
def test_usr1_checkpoints_requeues_and_resumes_like_an_uninterrupted_run(pretrain, to):
    recipe, _, straight_log, straight_dir = pretrain
    log = recipe.parent / f"preempted-{to}.log"
    run_dir = recipe.parent / "runs" / f"preempted-{to}"
    job = sbatch("pretrain.sh", str(recipe), f"run.name=preempted-{to}", log=log)
    wait_step(run_dir, 3, job, log=log)
    scancel = ["scancel", "--signal=USR1", *{"step": [], "full": ["--full"], "batch": ["--batch"]}[to], job]
    subprocess.run(scancel, check=True)
    time.sleep(0.2)
    subprocess.run(scancel, check=True)  # a second signal, likely during the save
    info = wait_job(job, lambda i: i["JobState"] == "COMPLETED", log=log)
    assert (info["ExitCode"], info["Restarts"]) == ("0:0", "1"), read_log(log)

    text = log.read_text()
    found = re.findall(r"bigtrain: preempted by SIGUSR1 at step (\d+); checkpoint saved", text)
    assert len(found) == 1, text[-4000:]  # one stop, however many copies of the signal arrived
    step = int(found[0])
    assert 3 <= step < STEPS
    assert text.count(f"requeueing Slurm job {job}") == 1
    passed_on = text.count("bigtrain: batch shell got SIGUSR1: passed on to the training step")
    assert passed_on == (0 if to == "step" else 1)  # the shell passes on its first signal, not the second
    assert f"resuming at step {step}" in text and f"bigtrain: finished step {STEPS}" in text
    assert (run_dir / f"checkpoints/step-{step:07d}/manifest.json").is_file()  # written at the signal
    assert losses(run_dir) == losses(straight_dir)  # CPU fp32, same seeds, RNG restored: bit for bit
    ids = wandb_ids(run_dir)
    assert len(ids) == 1  # the requeued job continued the same wandb run
    final = json.loads((run_dir / f"checkpoints/step-{STEPS:07d}/trainer.json").read_text())
    assert {final["wandb_run_id"]} == ids


def test_killed_job_requeued_resumes_from_its_last_periodic_checkpoint(pretrain):
    recipe, _, _, straight_dir = pretrain
    log = recipe.parent / "killed.log"
    run_dir = recipe.parent / "runs" / "killed"
    job = sbatch("pretrain.sh", str(recipe), "run.name=killed", log=log)
    wait_step(run_dir, EVERY + 2, job, log=log)
    # SIGKILL to every process of the training step, as a crashed node would: no warning, no preemption
    # checkpoint. (`scancel --signal=KILL` cancels the job instead: SIGTERM first, which checkpoints.)
    listed = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True, check=True).stdout
    for line in listed.splitlines()[1:]:
        pid, _, step = line.split()[:3]
        if step == "0":
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_job(job, lambda i: i["JobState"] not in ("RUNNING", "CONFIGURING", "COMPLETING"), log=log)
    killed_at = max(r["step"] for r in read_metrics(run_dir)[0])
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_job(job, lambda i: i["JobState"] == "COMPLETED" and i["Restarts"] == "1", log=log)
    assert info["ExitCode"] == "0:0", read_log(log)

    text = log.read_text()
    assert "preempted" not in text
    resumed = int(re.search(r"resuming at step (\d+)", text).group(1))
    assert resumed % EVERY == 0 and EVERY <= resumed <= killed_at  # the newest complete periodic checkpoint
    assert losses(run_dir) == losses(straight_dir)  # steps after it were dropped and redone, identically


def test_scancel_checkpoints_but_does_not_requeue(pretrain):
    """`scancel` sends SIGTERM to every process: training checkpoints and stops, but a job the user
    cancelled stays cancelled (the launcher requeues only a job that is still RUNNING)."""
    recipe = pretrain[0]
    log = recipe.parent / "cancelled.log"
    run_dir = recipe.parent / "runs" / "cancelled"
    job = sbatch("pretrain.sh", str(recipe), "run.name=cancelled", log=log)
    wait_step(run_dir, 3, job, log=log)
    subprocess.run(["scancel", job], check=True)
    info = wait_job(job, lambda i: i["JobState"] == "CANCELLED", log=log)
    time.sleep(1)  # let the log catch up with the launcher's last line
    assert info["Restarts"] == "0"
    text = log.read_text()
    found = re.search(r"bigtrain: preempted by SIGTERM at step (\d+); checkpoint saved", text)
    assert found, text[-4000:]
    assert (run_dir / f"checkpoints/step-{int(found.group(1)):07d}/manifest.json").is_file()
    assert f"Slurm job {job} is " in text and "not requeued" in text
    time.sleep(2)
    assert job_info(job)["JobState"] == "CANCELLED"


def test_sbatch_finetune_starts_from_the_pretrain_run(pretrain, cache_dir):
    recipe, _, _, pretrain_dir = pretrain
    sft = write_recipe(recipe.parent / "sft.yaml", tiny_recipe(
        cache_dir, recipe.parent / "runs", model={"arch": "decoder", "preset": "debug", "max_seq_len": 64},
        task={"name": "sft"}, train={"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4},
        data={"source": "python-stdlib-docstrings", "max_documents": 300, "seq_len": 64, "validation_split": 0.1}))
    log = recipe.parent / "finetune.log"
    job = sbatch("finetune.sh", str(sft), "run.name=sft", f"model.init_from={pretrain_dir}", log=log, wait=True)
    info = job_info(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), read_log(log)
    assert "ddp × 2 on cpu" in log.read_text()
    run_dir = recipe.parent / "runs" / "sft"
    report = json.loads((run_dir / "init_from.json").read_text())
    assert report["checkpoint"] == str(pretrain_dir / f"checkpoints/step-{STEPS:07d}")
    assert report["new"] == [] and report["unused"] == [] and report["loaded"]
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- without Slurm


def test_sigterm_to_bigtrain_train_checkpoints_exits_75_and_rerun_matches_uninterrupted(tmp_path, cache_dir):
    """The signal comes while the async save of step 3 is still being written (tests/integration/faulty.py makes
    that save sleep 4 s in its background thread). Stopping at step 3's boundary, the exit waits for that save;
    stopping at step 4's, the preemption save waits for it, then writes step 4 synchronously. Either way every
    checkpoint is complete before exit 75."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4},
        eval={"every": 30, "max_samples": 8}, checkpoint={"every": 0, "keep_last": 0}))
    straight = run_cli("train", str(recipe), "run.name=straight", env=ENV)
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "runs" / "stopped"
    in_flight = run_dir / "checkpoints/.tmp-step-0000003"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/integration/faulty.py"), "train", str(recipe),
                             "run.name=stopped", "checkpoint.every=3"],
                            env={**ENV, "BIGTRAIN_FAULT": "slow_save:rank=0:step=3:seconds=4"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not in_flight.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert in_flight.is_dir(), "the save of step 3 never started"
        assert not (run_dir / "checkpoints/step-0000003").exists()  # still in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # a second signal changes nothing
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "faulty: rank 0's save of step 3 sleeps 4 s" in err
    found = re.search(r"bigtrain: preempted by SIGTERM at step (\d+); checkpoint saved", err)
    assert found, err[-3000:]
    step = int(found.group(1))
    assert step >= 3 and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        {"step-0000003", f"step-{step:07d}"})
    verified = run_cli("verify", str(run_dir), env=ENV)  # both complete: every byte matches its manifest
    assert verified.returncode == 0 and "step-0000003" in verified.stdout + verified.stderr, verified.stderr
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == step

    rest = run_cli("train", str(recipe), "run.name=stopped", env=ENV)  # same threads: same float sums
    assert rest.returncode == 0, rest.stderr
    assert f"resuming at step {step}" in rest.stderr
    assert losses(run_dir) == losses(tmp_path / "runs" / "straight")


def test_sigterm_during_eval_abandons_it_and_checkpoints_the_step(tmp_path, cache_dir):
    """A signal while evaluating (a long eval: half the documents held out, one sample per forward) ends the
    eval at the next batch; the step before it is checkpointed, and its eval is not logged half-done."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        cache_dir, tmp_path / "runs", train={"max_steps": 20, "global_batch_size": 8, "micro_batch_size": 4},
        data={"validation_split": 0.5}, eval={"every": 5, "max_samples": None, "micro_batch_size": 1},
        checkpoint={"every": 0, "keep_last": 0}))
    run_dir = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(recipe)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_step(run_dir, 5, "", log=tmp_path / "none") == 5  # step 5 logged: its eval is running now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "bigtrain: preempted by SIGTERM at step 5; checkpoint saved" in err
    records, evals = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and evals == []
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000005"]


def start_faulty(fault: str, *args: str, nproc: int = 1) -> subprocess.Popen:
    """`faulty.py ARGS` (tests/integration/faulty.py) with BIGTRAIN_FAULT, alone or under torchrun; stderr piped."""
    script = [str(REPO / "tests/integration/faulty.py"), *args]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                             if nproc > 1 else []), *script]
    return subprocess.Popen(cmd, env={**ENV, "PYTHONPATH": str(REPO), "BIGTRAIN_FAULT": fault}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_faults(proc: subprocess.Popen, count: int = 1) -> list[str]:
    """stderr lines up to the `count`-th "faulty: " line (the fault has started); fails if the process ends first."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        count -= line.startswith("faulty: ")
        if count == 0:
            return lines
    raise AssertionError(f"the fault never started (exit {proc.wait()}):\n{''.join(lines)[-3000:]}")


def stop(proc: subprocess.Popen, *signals: tuple[signal.Signals, float], pids: list[int] | None = None
         ) -> tuple[int, str, float]:
    """Send each (signal, seconds to wait after it) to `pids` (default: the process); then (exit code, the rest of
    stderr, seconds from the last signal to the exit)."""
    try:
        for sig, pause_s in signals:
            for pid in pids or [proc.pid]:
                os.kill(pid, sig)
            sent = time.monotonic()
            time.sleep(pause_s)
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
        return code, err, time.monotonic() - sent
    finally:
        proc.kill()


def complete_checkpoints(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


def test_sigterm_during_resume_or_init_from_exits_75_at_once_and_a_second_sigterm_ends_a_save(tmp_path, cache_dir):
    """Outside the step loop there is nothing new to save: SIGTERM while resuming (or loading init_from weights)
    exits 75 within seconds, with preempted.json naming the checkpoint to continue from, and leaves the checkpoints
    as they were. In the loop, the first SIGTERM waits for the checkpoint being saved (slowed to 120 s); a second
    one 2.5 s later exits 143 at once, the step's checkpoint never completed."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs", train={"max_steps": 4},
                                                           checkpoint={"every": 0, "keep_last": 0, "async_save": False}))
    first = tmp_path / "runs" / "first"
    done = run_cli("train", str(recipe), "run.name=first", env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = start_faulty("stall:rank=0:at=resume:seconds=120", "train", str(recipe), "run.name=first")
    wait_for_faults(proc)
    code, err, took_s = stop(proc, (signal.SIGTERM, 0))
    assert code == 75 and took_s < 10, err[-3000:]
    assert "bigtrain: preempted by SIGTERM at 'resume' before the loop on rank 0; nothing new to save" in err
    assert json.loads((first / "preempted.json").read_text()) == {
        "signal": "SIGTERM", "step": 0, "checkpoint": str(first / "checkpoints/step-0000004")}
    assert complete_checkpoints(first) == ["step-0000004"]

    proc = start_faulty("stall:rank=0:at=init_from:seconds=120", "train", str(recipe), "run.name=second",
                        f"model.init_from={first}")
    wait_for_faults(proc)
    code, err, took_s = stop(proc, (signal.SIGUSR1, 0))
    assert code == 75 and took_s < 10, err[-3000:]
    assert "bigtrain: preempted by SIGUSR1 at 'build: data, model, engine' before the loop on rank 0" in err
    assert complete_checkpoints(tmp_path / "runs" / "second") == []

    proc = start_faulty("slow_save:rank=0:step=6:seconds=120", "train", str(recipe), "run.name=first",
                        "train.max_steps=8", "checkpoint.every=2")
    wait_for_faults(proc)
    code, err, took_s = stop(proc, (signal.SIGTERM, 2.5), (signal.SIGTERM, 0))
    assert code == 143 and took_s < 5, err[-3000:]
    assert "bigtrain: a second SIGTERM (" in err and "at 'checkpoint save' after step 6 on rank 0" in err
    assert "exiting at once" in err and "checkpoint saved" not in err
    assert complete_checkpoints(first) == ["step-0000004"]  # step 6's save never finished; step 4's is there


def test_sigterm_while_rank_0_prepares_the_data_stops_every_rank_with_75_at_once(tmp_path, cache_dir):
    """2 ranks under torchrun: rank 0 prepares the data (slowed to 300 s), rank 1 waits in short all-reduces.
    SIGTERM to both (as Slurm sends it) ends both with 75 within seconds; rank 0 leaves preempted.json."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(cache_dir, tmp_path / "runs"))
    proc = start_faulty("stall:rank=0:at=prepare:seconds=300", "train", str(recipe), nproc=2)
    lines = wait_for_faults(proc)
    from launcher.cli import descendants

    time.sleep(2)  # rank 1 is in its polls too
    code, err, took_s = stop(proc, (signal.SIGTERM, 0), pids=descendants(proc.pid))
    err = "".join(lines) + err
    assert took_s < 15, err[-3000:]
    assert sorted(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: 75 ", err)) == ["0", "1"], err[-3000:]
    assert "bigtrain: preempted by SIGTERM at 'build: data, model, engine' before the loop on rank 0" in err
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "preempted.json").read_text()) == {"signal": "SIGTERM", "step": 0, "checkpoint": None}
    assert complete_checkpoints(run_dir) == []
