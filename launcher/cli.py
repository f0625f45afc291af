"""`bigtrain launch RECIPE [overrides] [flags]`: validate the recipe for the job's world size, then exec
torchrun, deepspeed or accelerate so that every process runs `python -m bigtrain train RECIPE overrides`.

Run it once per node (by hand, from an sbatch script via `srun`, or by a scheduler). Imports no torch, so
it starts in a fraction of a second; a bad flag or recipe is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from bigtrain.errors import UserError
from launcher.argv import LAUNCHERS
from launcher.topology import resolve_topology


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        print(f"bigtrain launch: error: {message} (see bigtrain launch -h)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bigtrain launch", description=(
        "Start `bigtrain train RECIPE` in every process of this node. Topology comes from the flags, else "
        "torchrun's or Slurm's environment, else one process per local GPU (one on CPU)."))
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, help="processes on this node (default: local GPUs, or 1)")
    p.add_argument("--nnodes", type=int, help="nodes in the job (default 1)")
    p.add_argument("--node-rank", "--node_rank", type=int, help="this node's index, 0..nnodes-1 (default 0)")
    p.add_argument("--master-addr", "--master_addr", help="host of node 0 (needed with several nodes outside Slurm)")
    p.add_argument("--master-port", "--master_port", type=int, help="free TCP port on node 0 (default 29500)")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun", help="process launcher (default torchrun)")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the command (shell-quoted) and exit")
    return p


def build_command(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str], bool]:
    """The launcher's argv, the environment variables to add and --dry-run, for `bigtrain launch ARGV` under `env`."""
    from bigtrain.config import load_config  # no torch: config is stdlib + yaml

    args = _parser().parse_intermixed_args(argv)
    topo = resolve_topology(env, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port)
    cfg = load_config(args.recipe, args.overrides, world_size=topo.world_size)  # fail here, not in N processes
    train = ["train", args.recipe, *args.overrides]
    extra = {"precision": cfg.parallel.precision} if args.launcher == "accelerate" else {}
    command = LAUNCHERS[args.launcher](topo, train, timeout_s=cfg.parallel.init_timeout_s, **extra)
    added_env = {"OMP_NUM_THREADS": str(topo.omp_threads)} if topo.omp_threads else {}
    return command, added_env, args.dry_run


def main(argv: list[str]) -> int:
    try:
        command, added_env, dry_run = build_command(argv, dict(os.environ))
    except UserError as e:
        print(f"bigtrain launch: error: {e}", file=sys.stderr, flush=True)
        return 2
    if dry_run:
        print(shlex.join([f"{k}={v}" for k, v in added_env.items()] + command))
        return 0
    os.environ.update(added_env)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"bigtrain launch: error: cannot run {command[0]}: {e.strerror} — is it installed in this environment?",
              file=sys.stderr, flush=True)
        return 2
