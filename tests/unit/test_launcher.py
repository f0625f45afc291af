"""launcher/: Slurm nodelists, topology from flags and environments, the argv per launcher (`--dry-run`),
accelerate's choices as recipe overrides, and the preflight's diagnosis of a mis-assembled job."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from bigtrain.core.errors import UserError
from launcher.accelerate_env import accelerate_overrides
from launcher.topology import parse_nodelist, resolve_topology
from tests.conftest import REPO, tiny_recipe, write_recipe

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "cache", tmp_path / "runs",
                                                         train={"global_batch_size": 8, "micro_batch_size": 1}))


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m bigtrain launch ARGS` with only the given environment (plus a PATH without scontrol)."""
    base = {"PATH": "/nonexistent", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bigtrain", "launch", *args], capture_output=True, text=True,
                          env=base, cwd=REPO, timeout=60)


def dry_run(*args: str, env: dict | None = None) -> list[str]:
    result = launch(*args, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


# --------------------------------------------------------------------------- Slurm nodelists


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a-[1-2]-b", ["a-1-b", "a-2-b"]),
    ("r[1-2]n[08-10]", ["r1n08", "r1n09", "r1n10", "r2n08", "r2n09", "r2n10"]),
    ("host", ["host"]),
    ("gpu[9-10],cpu[001,3]", ["gpu9", "gpu10", "cpu001", "cpu3"]),
])
def test_parse_nodelist_expands_slurm_hostlists(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node[a-b]", "node01]"])
def test_parse_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST"):
        parse_nodelist(nodelist)


SLURM = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[01-03,07],gpu5", "SLURM_NNODES": "5",
         "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_ON_NODE": "32"}


def test_topology_from_slurm_environment_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist is parsed here
    topo = resolve_topology(SLURM)
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node) == (5, 2, 4)
    assert topo.master_addr == "node01" and topo.master_port == 29500 + 1234
    assert topo.omp_threads == 8 and topo.static


def test_topology_under_srun_on_part_of_the_allocation_comes_from_the_job_step(monkeypatch):
    """`srun --nodes 2 -w node03,node07` inside a 5-node job: the master is the step's first host, the node count
    the step's (SLURM_NODEID is step-relative already); a step list Slurm leaves out falls back to the job's."""
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist is parsed here
    step = {**SLURM, "SLURM_STEP_NODELIST": "node[03,07]", "SLURM_NODELIST": "node[01-03,07],gpu5",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1"}
    topo = resolve_topology(step)
    assert (topo.master_addr, topo.nnodes, topo.node_rank) == ("node03", 2, 1)
    topo = resolve_topology({**SLURM, "SLURM_NODELIST": "gpu5", "SLURM_NNODES": "1", "SLURM_NODEID": "0"})
    assert (topo.master_addr, topo.nnodes) == ("gpu5", 1)
    assert resolve_topology(SLURM).master_addr == "node01"  # only the job's list
    with pytest.raises(UserError, match=r"^SLURM_STEP_NODELIST: cannot parse range 'a' in 'node\[a\]'$"):
        resolve_topology({**step, "SLURM_STEP_NODELIST": "node[a]"})


CPU_SLURM = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "cpu[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("cpus, expected", [
    ({"SLURM_CPUS_ON_NODE": "6", "SLURM_CPUS_PER_TASK": "3"}, 6),  # SLURM_CPUS_ON_NODE wins
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_NTASKS_PER_NODE": "2"}, 8),
    ({"SLURM_CPUS_PER_TASK": "4", "SLURM_TASKS_PER_NODE": "3(x2)"}, 12),
    ({"SLURM_CPUS_PER_TASK": "5"}, 5),
])
def test_cpu_only_slurm_node_runs_one_single_threaded_process_per_cpu_slot(monkeypatch, cpus, expected):
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi, no scontrol
    topo = resolve_topology({**CPU_SLURM, "SLURM_GPUS_ON_NODE": "0", **cpus})
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node, topo.omp_threads) == (2, 1, expected, 1)
    assert topo.master_addr == "cpu1" and topo.world_size == 2 * expected


def test_cpu_only_slurm_node_takes_nproc_per_node_flag_and_splits_threads(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    topo = resolve_topology({**CPU_SLURM, "SLURM_CPUS_ON_NODE": "8"}, nproc_per_node=2)
    assert (topo.nproc_per_node, topo.omp_threads) == (2, 4)
    # Without Slurm's CPU count (or outside Slurm) a CPU node still gets one process.
    assert resolve_topology(CPU_SLURM).nproc_per_node == 1
    assert resolve_topology({"CUDA_VISIBLE_DEVICES": ""}).nproc_per_node == 1


def test_dry_run_on_a_cpu_only_slurm_node(recipe):
    argv = dry_run(str(recipe), env={"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "vm", "SLURM_NNODES": "1",
                                     "SLURM_NODEID": "0", "SLURM_CPUS_ON_NODE": "2"})
    assert argv[:4] == ["OMP_NUM_THREADS=1", f"{VENV_BIN}/torchrun", "--nnodes", "1"]
    assert argv[4:6] == ["--nproc_per_node", "2"]


def test_flags_win_over_torchrun_and_slurm_environment():
    topo = resolve_topology({**SLURM, "PET_NNODES": "3", "MASTER_ADDR": "10.1.1.1"}, nproc_per_node=2, node_rank=1)
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node, topo.master_addr) == (3, 1, 2, "10.1.1.1")


def test_one_node_uses_every_visible_gpu_or_one_cpu_process():
    assert resolve_topology({"CUDA_VISIBLE_DEVICES": "0,1,5"}).nproc_per_node == 3
    assert resolve_topology({"CUDA_VISIBLE_DEVICES": ""}).nproc_per_node == 1
    topo = resolve_topology({"CUDA_VISIBLE_DEVICES": "-1"})
    assert (topo.nnodes, topo.nproc_per_node, topo.master_addr, topo.static) == (1, 1, None, False)


@pytest.mark.parametrize("kwargs, message", [
    ({"nnodes": 2, "node_rank": 2, "master_addr": "h"}, "--node-rank=2 must be in 0..1"),
    ({"nnodes": 2}, "several nodes need --master-addr"),
    ({"nproc_per_node": 0}, "--nproc-per-node=0 must be >= 1"),
    ({"master_port": 70000}, "--master-port=70000 must be in 1..65535"),
])
def test_bad_topology_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        resolve_topology({}, **kwargs)


# --------------------------------------------------------------------------- argv (--dry-run)


def test_dry_run_torchrun_on_one_node_uses_c10d_standalone(recipe):
    argv = dry_run(str(recipe), "optim.lr=1e-3", "--nproc-per-node", "2")
    assert argv == [f"{VENV_BIN}/torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
                    "-m", "bigtrain", "train", str(recipe), "optim.lr=1e-3"]


def test_dry_run_torchrun_multi_node_uses_static_rendezvous_with_node_rank(recipe):
    argv = dry_run(str(recipe), "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                   "--master-port", "29999", "--nproc-per-node", "2", "parallel.init_timeout_s=30")
    assert argv == [f"{VENV_BIN}/torchrun", "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", "1",
                    "--rdzv_backend", "static", "--master_addr", "10.0.0.1", "--master_port", "29999",
                    "--rdzv_conf", "timeout=30", "-m", "bigtrain", "train", str(recipe), "parallel.init_timeout_s=30"]


def test_dry_run_deepspeed_and_accelerate_from_flags(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "c", tmp_path / "runs", parallel={"precision": "bf16"},
                                                           train={"global_batch_size": 8, "micro_batch_size": 1}))
    flags = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29999",
             "--nproc-per-node", "2"]
    argv = dry_run(str(recipe), *flags, "--launcher", "deepspeed")
    hostfile = argv[argv.index("--hostfile") + 1]  # a private temp file: see test_deepspeed_hostfile_is_private
    assert argv == [
        f"{VENV_BIN}/deepspeed", "--num_gpus", "2", "--no_ssh", "--hostfile", hostfile, "--num_nodes", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--master_port", "29999", "--module", "bigtrain", "train", str(recipe)]
    assert dry_run(str(recipe), *flags, "--launcher", "accelerate") == [
        f"{VENV_BIN}/accelerate", "launch", "--multi_gpu", "--num_processes", "4", "--num_machines", "2",
        "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29999",
        "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "bigtrain", "train", str(recipe)]
    assert open(hostfile).read() == "node-0 slots=2\nnode-1 slots=2\n"  # node i is line i; names unused with --no_ssh
    os.unlink(hostfile)
    # One node, no port given: a free local port (deepspeed's and accelerate's default 29500 may be taken).
    single = dry_run(str(recipe), "--nproc-per-node", "2", "--launcher", "deepspeed")
    assert single[:3] == [f"{VENV_BIN}/deepspeed", "--num_gpus", "2"] and single[3] == "--master_port"
    assert 0 < int(single[4]) < 65536 and single[5:] == ["--module", "bigtrain", "train", str(recipe)]


def test_deepspeed_hostfile_is_private_and_never_reuses_a_planted_file(tmp_path, monkeypatch):
    """The hostfile is created exclusively under a random name, mode 0600: a file (or symlink) another user put
    at a predictable name in the shared temp dir is neither read nor written through."""
    import stat

    from launcher.argv import deepspeed_hostfile
    from launcher.topology import Topology

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a private stand-in for /tmp
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    for name in ("bigtrain-hostfile-3x2", "bigtrain-hostfile-3x2.0"):
        (tmp_path / name).symlink_to(victim)  # planted at the names a fixed scheme would use
    topo = Topology(nnodes=3, nproc_per_node=2, node_rank=0, master_addr="10.0.0.1", master_port=29999)
    first, second = deepspeed_hostfile(topo), deepspeed_hostfile(topo)
    assert first != second and {os.path.dirname(first), os.path.dirname(second)} == {str(tmp_path)}
    for path in (first, second):
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        assert open(path).read() == "node-0 slots=2\nnode-1 slots=2\nnode-2 slots=2\n"
    assert victim.read_text() == "keep\n"


@pytest.mark.parametrize("launcher, expected", [
    ("torchrun", ["--nnodes", "5", "--nproc_per_node", "4", "--node_rank", "2", "--rdzv_backend", "static",
                  "--master_addr", "node01", "--master_port", "30734"]),
    ("deepspeed", ["--num_gpus", "4", "--no_ssh", "--hostfile", "HOSTFILE", "--num_nodes", "5", "--node_rank", "2", "--master_addr", "node01",
                   "--master_port", "30734"]),
    ("accelerate", ["launch", "--multi_gpu", "--num_processes", "20", "--num_machines", "5", "--machine_rank", "2",
                    "--main_process_ip", "node01", "--main_process_port", "30734"]),
])
def test_dry_run_from_slurm_environment(recipe, launcher, expected):
    argv = dry_run(str(recipe), "train.global_batch_size=40", "--launcher", launcher, env=SLURM)
    if "--hostfile" in argv:  # a fresh private file each time (checked below); compare the rest
        at = argv.index("--hostfile") + 1
        os.unlink(argv[at])
        argv[at] = "HOSTFILE"
    assert argv[0] == "OMP_NUM_THREADS=8"  # 32 CPUs on the node / 4 processes
    assert argv[1] == f"{VENV_BIN}/{launcher}"
    assert argv[2:2 + len(expected)] == expected
    assert argv[-4:] == ["bigtrain", "train", str(recipe), "train.global_batch_size=40"]


def test_launcher_imports_no_torch(recipe):
    code = ("import sys; from bigtrain.cli import main; rc = main(['launch', sys.argv[1], '--dry-run']); "
            "heavy = sorted(m for m in ('torch', 'numpy', 'deepspeed', 'accelerate') if m in sys.modules); "
            "print(rc, heavy)")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.stdout.splitlines()[-1] == "0 []", result.stderr


@pytest.mark.parametrize("args, message", [
    (["--nproc-per-node", "3"], "bigtrain launch: error: train.global_batch_size=8 is not divisible by "
                                "train.micro_batch_size × data-parallel size = 1 × 3 = 3"),
    (["--bogus"], "bigtrain launch: error: unrecognized arguments: --bogus"),
    (["--launcher", "mpirun"], "bigtrain launch: error: argument --launcher: invalid choice: 'mpirun'"),
    (["train.lr=1"], "bigtrain launch: error: {recipe}: unknown key 'train.lr' — did you mean 'optim.lr'?"),
    # The model is checked too, as `bigtrain check` does, before any process starts.
    (["model.preset=nope", "model.n_heads=7"], "bigtrain launch: error: model.preset: unknown preset 'nope'"),
    (["model.n_heads=7"], "bigtrain launch: error: model.n_heads: d_model 64 is not divisible by n_heads 7"),
    (["data.seq_len=128"], "bigtrain launch: error: data.seq_len=128 exceeds the model's max_seq_len=64"),
])
def test_bad_flags_or_recipe_exit_2_with_one_line(recipe, args, message):
    result = launch(str(recipe), *args, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(message.format(recipe=recipe))


def test_missing_recipe_exits_2_with_one_line(tmp_path):
    result = launch(str(tmp_path / "nope.yaml"), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"bigtrain launch: error: recipe not found: {tmp_path / 'nope.yaml'}"


# --------------------------------------------------------------------------- accelerate's choices


ACCEL = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False"}


def test_accelerate_defaults_are_no_choice():
    assert accelerate_overrides(ACCEL, {"parallel": {"precision": "bf16"}}) == []
    assert accelerate_overrides({}, {}) == []  # not under accelerate
    assert accelerate_overrides({"ACCELERATE_USE_DEEPSPEED": "true"}, {}) == []  # no ACCELERATE_MIXED_PRECISION


def test_accelerate_choices_fill_keys_the_recipe_left_open():
    env = {**ACCEL, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_USE_CPU": "True"}
    assert accelerate_overrides(env, {"parallel": {"strategy": "auto"}}) == [
        "parallel.device=cpu", "parallel.precision=bf16", "parallel.strategy=deepspeed", "parallel.zero_stage=3"]
    fsdp = {**ACCEL, "ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": "false"}
    assert accelerate_overrides(fsdp, {}) == ["parallel.strategy=fsdp", "parallel.offload_params=cpu"]
    # Agreeing with the recipe is fine (bf16 mixed precision also agrees with bf16-pure).
    assert accelerate_overrides({**ACCEL, "ACCELERATE_MIXED_PRECISION": "bf16"},
                                {"parallel": {"precision": "bf16-pure"}}) == []


@pytest.mark.parametrize("env, parallel, message", [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {"precision": "bf16"},
     "accelerate launch --mixed_precision fp16 contradicts parallel.precision: bf16 in r.yaml — drop the flag or "
     "set parallel.precision=fp16"),
    ({"ACCELERATE_USE_FSDP": "true"}, {"strategy": "ddp"},
     "accelerate launch --use_fsdp contradicts parallel.strategy: ddp in r.yaml"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
     {"strategy": "deepspeed", "zero_stage": 3}, "accelerate launch --zero_stage 1 contradicts parallel.zero_stage: 3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, {},
     "accelerate launch --zero_stage 0: bigtrain's deepspeed strategy runs ZeRO stage 1, 2 or 3"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, {}, "accelerate launch --mixed_precision fp8 is not supported"),
])
def test_accelerate_choice_contradicting_the_recipe_is_an_error(env, parallel, message):
    with pytest.raises(UserError) as e:
        accelerate_overrides({**ACCEL, **env}, {"parallel": parallel}, where="r.yaml")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- preflight diagnosis


def view(rank, nodes, node, per_node=1, world=2, master="127.0.0.1:29500"):
    return {"rank": rank, "host": f"h{node}", "world": world, "nodes": nodes, "node": node, "per_node": per_node,
            "master": master, "master_ip": master}


def test_preflight_accepts_a_consistent_job_and_names_the_rank_that_differs():
    from bigtrain.parallel.dist import preflight_problem

    assert preflight_problem([view(0, 2, 0), view(1, 2, 1)], 2) is None
    assert preflight_problem([view(0, 2, 0), view(1, 3, 1)], 2) == (
        "rank 1 (h1, node 1) expects 3 nodes but rank 0 (h0, node 0) expects 2 nodes — start every node with the "
        "same --nnodes")
    assert "expects master 10.0.0.2:29500 but rank 0 (h0, node 0) expects master 127.0.0.1:29500" in \
        preflight_problem([view(0, 2, 0), view(1, 2, 1, master="10.0.0.2:29500")], 2)
    assert preflight_problem([view(0, 2, 0, world=3), view(1, 2, 1, world=3)], 2) == \
        "rank 0 (h0, node 0) was started for 3 processes but 2 joined"
    assert preflight_problem([view(0, 1, 0, per_node=1), view(1, 1, 0, per_node=1)], 2) == (
        "2 processes joined but every rank expects 1 nodes × 1 per node = 1 — check --nnodes and --nproc-per-node "
        "on each node")
    assert preflight_problem([view(0, 2, 0), view(1, 2, 0)], 2) == \
        "1 distinct node ranks joined but 2 nodes were expected — check --node-rank on each node"


# A training rank (`python -m bigtrain train OUT`, from a fake `bigtrain` package) with a child of its own, like
# torch.compile's worker pool; each writes OUT/<who> when it gets SIGTERM. The agent (a script, like torchrun)
# starts two ranks and exits with their worst code.
FAKE_RANK = """
import os, signal, subprocess, sys, time
from pathlib import Path
out, rank = Path(sys.argv[2]), os.environ["RANK"]
helper = subprocess.Popen([sys.executable, "-c", HELPER, str(out / f"helper-{rank}")])
(out / f"helper-{rank}.pid").write_text(str(helper.pid))
def on_term(signum, frame):
    (out / f"rank-{rank}").write_text("SIGTERM")
    sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
(out / f"ready-{rank}").write_text("")
time.sleep(60)
"""
HELPER = """
import signal, sys, time
from pathlib import Path
def on_term(signum, frame):
    Path(sys.argv[1]).write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
time.sleep(60)
"""
FAKE_AGENT = """
import os, subprocess, sys
# -S: no site-packages, where the real bigtrain's editable install would win over the fake one on PYTHONPATH
ranks = [subprocess.Popen([sys.executable, "-S", "-u", "-m", "bigtrain", "train", sys.argv[1]],
                          env={**os.environ, "RANK": str(r)}) for r in range(2)]
sys.exit(max(p.wait() for p in ranks))
"""


def test_launcher_forwards_sigterm_to_the_training_ranks_but_not_to_their_children(tmp_path):
    fake = tmp_path / "fake"
    (fake / "bigtrain").mkdir(parents=True)
    (fake / "bigtrain" / "__init__.py").write_text("")
    (fake / "bigtrain" / "__main__.py").write_text(f"HELPER = {HELPER!r}\n{FAKE_RANK}")
    (fake / "agent.py").write_text(FAKE_AGENT)
    out = tmp_path / "out"
    out.mkdir()
    launch = ("import os, sys\nfrom launcher.cli import run_forwarding_signals\n"
              "sys.exit(run_forwarding_signals(sys.argv[1:], dict(os.environ)))")
    proc = subprocess.Popen([sys.executable, "-c", launch, sys.executable, str(fake / "agent.py"), str(out)], cwd=fake,
                            env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO}"})
    try:
        deadline = time.monotonic() + 30
        while not all((out / name).exists() for r in (0, 1) for name in (f"ready-{r}", f"helper-{r}.pid")):
            assert time.monotonic() < deadline and proc.poll() is None, "the fake ranks never started"
            time.sleep(0.05)
        time.sleep(1)  # the helpers have installed their handlers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75  # the agent's code: both ranks stopped on the forwarded signal
        time.sleep(0.5)
        assert sorted(p.name for p in out.glob("rank-*")) == ["rank-0", "rank-1"]
        assert not list(out.glob("helper-?"))  # the ranks' own children got nothing
    finally:
        proc.kill()
        for pid_file in out.glob("helper-*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
