"""`bigtrain launch RECIPE [overrides] [flags]`: validate the recipe for the job's world size, then run
torchrun, deepspeed or accelerate so that every process runs `python -m bigtrain train RECIPE overrides`.

Run it once per node (by hand, from an sbatch script via `srun`, or by a scheduler). Imports no torch, so
it starts in a fraction of a second; a bad flag or recipe is one line on stderr and exit code 2.

Preemption: the launcher runs torchrun as a child that ignores SIGUSR1 and SIGTERM (torchrun would die on
SIGUSR1 and kill the workers 30 s after a SIGTERM), and passes either signal on to the training processes
(not to their own children, such as torch.compile's workers), which stop as bigtrain/train/preempt.py says. Rank 0
leaves `preempted.json` in the run dir; seeing it, the launcher exits 75 (EXIT_PREEMPTED) and, with --requeue
under Slurm, node 0 requeues the job first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bigtrain.core.errors import UserError
from bigtrain.train.preempt import EXIT_PREEMPTED, PREEMPT_SIGNALS, PREEMPTED_MARKER  # stdlib only, like config
from launcher.argv import LAUNCHERS
from launcher.topology import resolve_topology


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        print(f"bigtrain launch: error: {message} (see bigtrain launch -h)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bigtrain launch", description=(
        "Start `bigtrain train RECIPE` in every process of this node. Topology comes from the flags, else "
        "torchrun's or Slurm's environment, else one process per local GPU (on a CPU-only Slurm node one per "
        "allocated CPU; elsewhere one on CPU)."))
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, help="processes on this node (default: local GPUs; on a CPU-only Slurm node its allocated CPUs; else 1)")
    p.add_argument("--nnodes", type=int, help="nodes in the job (default 1)")
    p.add_argument("--node-rank", "--node_rank", type=int, help="this node's index, 0..nnodes-1 (default 0)")
    p.add_argument("--master-addr", "--master_addr", help="host of node 0 (needed with several nodes outside Slurm)")
    p.add_argument("--master-port", "--master_port", type=int, help="free TCP port on node 0 (default 29500)")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun", help="process launcher (default torchrun)")
    p.add_argument("--requeue", action="store_true",
                   help="under Slurm: after a preemption checkpoint, requeue the job (`scontrol requeue`) so it resumes")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the command (shell-quoted) and exit")
    return p




@dataclass(frozen=True)
class Launch:
    command: list[str]
    added_env: dict[str, str]
    dry_run: bool
    run_dir: Path
    node_rank: int
    requeue: bool
    temp_files: tuple[str, ...] = ()  # made for this launch (the deepspeed hostfile); removed when it ends


def build_command(argv: list[str], env: dict[str, str]) -> Launch:
    """What `bigtrain launch ARGV` under `env` runs: the launcher's argv, the environment variables to add, etc."""
    from bigtrain.config import load_config  # no torch: config is stdlib + yaml
    from bigtrain.plan.model_check import check_model  # no torch until a model is built

    args = _parser().parse_intermixed_args(argv)
    topo = resolve_topology(env, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port)
    cfg = load_config(args.recipe, args.overrides, world_size=topo.world_size)  # fail here, not in N processes
    check_model(cfg)  # as `bigtrain check` does, torch-free
    train = ["train", args.recipe, *args.overrides]
    extra = {"precision": cfg.parallel.precision} if args.launcher == "accelerate" else {}
    command = LAUNCHERS[args.launcher](topo, train, timeout_s=cfg.parallel.init_timeout_s, **extra)
    added_env = {"OMP_NUM_THREADS": str(topo.omp_threads)} if topo.omp_threads else {}
    temp_files = tuple(value for flag, value in zip(command, command[1:]) if flag == "--hostfile")
    return Launch(command, added_env, args.dry_run, Path(cfg.run_dir()), topo.node_rank, args.requeue, temp_files)


def main(argv: list[str]) -> int:
    try:
        launch = build_command(argv, dict(os.environ))
    except UserError as e:
        print(f"bigtrain launch: error: {e}", file=sys.stderr, flush=True)
        return 2
    if launch.dry_run:  # the printed command names the hostfile, so a dry run leaves it for the user
        print(shlex.join([f"{k}={v}" for k, v in launch.added_env.items()] + launch.command))
        return 0
    marker = launch.run_dir / PREEMPTED_MARKER
    if launch.node_rank == 0:
        marker.unlink(missing_ok=True)  # a marker of an earlier start says nothing about this one
    try:
        returncode = run_forwarding_signals(launch.command, {**os.environ, **launch.added_env})
    finally:
        for path in launch.temp_files:
            Path(path).unlink(missing_ok=True)
    if returncode is None:
        return 2
    if returncode == 0 or not marker.is_file():
        return returncode
    try:
        note = json.loads(marker.read_text())
    except (OSError, ValueError):
        note = {}
    print(f"bigtrain launch: preempted by {note.get('signal', 'a signal')} at step {note.get('step', '?')}; "
          f"checkpoint {note.get('checkpoint') or 'none yet'}", file=sys.stderr, flush=True)
    if launch.requeue and launch.node_rank == 0:
        requeue(os.environ)
    return EXIT_PREEMPTED


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int | None:
    """Run the launcher as a child and wait; SIGUSR1/SIGTERM to this process go to the training processes.

    The child ignores both signals (and torchrun is told not to handle SIGTERM), so neither torchrun nor the
    workers die of them before the workers' PreemptionGuard takes over. Under Slurm every process of the
    step gets the signal directly anyway; forwarding makes a plain `kill` of this process behave the same.
    Returns the child's exit code, or None when it cannot be started."""
    def ignore_forwarded():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    # torchrun's --signals-to-handle (default includes SIGTERM) overrides TORCHELASTIC_SIGNALS_TO_HANDLE, and
    # PET_SIGNALS_TO_HANDLE sets that flag: both, so torchrun of any version leaves SIGTERM to the workers.
    handled = "SIGINT,SIGHUP,SIGQUIT"
    env = {**env, "TORCHELASTIC_SIGNALS_TO_HANDLE": handled, "PET_SIGNALS_TO_HANDLE": handled}
    try:
        child = subprocess.Popen(command, env=env, preexec_fn=ignore_forwarded)
    except OSError as e:
        print(f"bigtrain launch: error: cannot run {command[0]}: {e.strerror} — is it installed in this environment?",
              file=sys.stderr, flush=True)
        return None

    forwarded: list[int] = []  # signal numbers
    pending: list[int] = []

    def deliver():
        """The pending signals to the training processes; kept while none has started yet."""
        workers = training_processes(child.pid)
        while pending and workers:
            signum = pending.pop(0)
            for pid in workers:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass  # already gone

    def forward(signum, frame):
        forwarded.append(signum)
        pending.append(signum)
        deliver()

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        while True:
            try:
                return child.wait(timeout=1.0 if pending else None)
            except subprocess.TimeoutExpired:
                deliver()
            except KeyboardInterrupt:  # Ctrl-C reaches the child too (same process group): wait for it to stop
                continue
    finally:
        for sig, handler in previous.items():
            # After a preemption signal this process is on its way to the requeue and exit 75: a late copy (Slurm
            # signals every process of the step; the batch shell may pass one on) must not kill it first.
            signal.signal(sig, signal.SIG_IGN if forwarded else handler)


def descendants(pid: int, stop=lambda pid: False) -> list[int]:
    """Process ids below `pid` (children, grandchildren, …), read from /proc; empty where there is no /proc.
    Below a process for which `stop(pid)` holds, none are listed."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, …
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            if not stop(child):
                todo.append(child)
    return found


def training_processes(pid: int) -> list[int]:
    """The training processes below `pid` (torchrun's, deepspeed's or accelerate's workers: `python -m bigtrain
    train …`), not their own children: torch.compile's worker pool, for one, would die of a SIGTERM meant for
    training, failing the compile the rank needs to reach its checkpoint."""
    return [p for p in descendants(pid, stop=runs_bigtrain) if runs_bigtrain(p)]


def runs_bigtrain(pid: int) -> bool:
    """Whether process `pid` is a Python interpreter running the module bigtrain (`python [-u …] -m bigtrain`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    options = argv[1:]
    while options and options[0].startswith("-"):
        if options[0] == "-m":
            return options[1:2] == ["bigtrain"]
        options = options[2:] if options[0] in ("-X", "-W") else options[1:]  # those two take a value
    return False


def requeue(env) -> None:
    """`scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and resumes from its checkpoint.
    Only a RUNNING job: one being cancelled (`scancel` sends SIGTERM too) stays cancelled. Slurm ends this
    job step as part of the requeue, so it is the launcher's very last act."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        print("bigtrain launch: --requeue outside a Slurm job: nothing to requeue", file=sys.stderr, flush=True)
        return
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    state = shown.split("JobState=", 1)[1].split()[0] if "JobState=" in shown else "UNKNOWN"
    if state != "RUNNING":  # `scancel` (COMPLETING/CANCELLED): the user ended the job — do not bring it back
        print(f"bigtrain launch: Slurm job {job} is {state}, not requeued (resubmit the same command to continue)",
              file=sys.stderr, flush=True)
        return
    print(f"bigtrain launch: requeueing Slurm job {job}", file=sys.stderr, flush=True)
    for attempt in range(3):
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            return
        time.sleep(2 ** attempt)
    print(f"bigtrain launch: error: scontrol requeue {job} failed: {result.stderr.strip()} — resubmit the same "
          f"command to continue", file=sys.stderr, flush=True)
