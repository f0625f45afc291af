"""Where this node sits in the job: node count, node rank, processes per node and the master (rank 0's host).

Each field comes from the first place that says it: a `bigtrain launch` flag, torchrun's own
environment (`PET_NNODES`, `PET_NODE_RANK`, … as torchrun reads them), the generic variables a
cluster scheduler exports (`MASTER_ADDR`, `MASTER_PORT`, `NNODES`, `NODE_RANK`), Slurm's — the
step's where Slurm gives it, as an `srun` may run on a subset of the allocation: `SLURM_STEP_NUM_NODES` (else
`SLURM_NNODES`), `SLURM_NODEID` (step-relative), the first host of `SLURM_STEP_NODELIST` (else `SLURM_NODELIST`,
else `SLURM_JOB_NODELIST`), `SLURM_GPUS_ON_NODE` —
else one node with one process per local GPU (counted without importing torch). Without GPUs: on a
Slurm node one single-threaded process per allocated CPU (`SLURM_CPUS_ON_NODE`, or
`SLURM_CPUS_PER_TASK` × tasks on the node), OMP_NUM_THREADS=1 each; elsewhere one process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from bigtrain.core.errors import UserError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Topology:
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str | None  # None: single node, rendezvous on this host
    master_port: int | None  # None: pick a free port on this host
    omp_threads: int | None = None  # OMP_NUM_THREADS per process when the scheduler says how many CPUs we have

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def static(self) -> bool:
        """Node ranks matter (several nodes, or a master named): rendezvous at a fixed master, not c10d."""
        return self.nnodes > 1 or self.master_addr is not None


# --------------------------------------------------------------------------- Slurm nodelists


# Where the master's host comes from: the job step's nodes first (an `srun` on part of the allocation).
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")


def parse_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm hostlist (`node[01-03,07],gpu5`, `a-[1-2]-b`, `r[1-2]n[1-2]`) into host names, in order;
    `name` is the variable it came from, for the error."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand(item, nodelist, name))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand(item: str, whole: str, name: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        if "[" in item or "]" in item:
            raise UserError(f"{name}: cannot parse '{whole}' (unbalanced brackets)")
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    numbers = []
    for part in match.group(1).split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UserError(f"{name}: cannot parse range '{part}' in '{whole}'")
        width = len(lo)  # zero padding: node[01-03] → node01, node02, node03
        for n in range(int(lo), int(hi if sep else lo) + 1):
            numbers.append(f"{n:0{width}d}")
    return [expanded for number in numbers for expanded in _expand(head + number + tail, whole, name)]


def slurm_hosts(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Host names of a Slurm nodelist: `scontrol show hostnames` when it is installed, else our parser."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol: the nodelist syntax is simple enough to expand ourselves
    return parse_nodelist(nodelist, name)


# --------------------------------------------------------------------------- local devices


def count_local_gpus(env: Mapping[str, str]) -> int:
    """GPUs this node may use, without importing torch: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


# --------------------------------------------------------------------------- resolution


def _int(value: str | int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not an integer") from None


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def slurm_cpu_slots(env: Mapping[str, str]) -> int | None:
    """CPUs Slurm allocated to this node: SLURM_CPUS_ON_NODE, else SLURM_CPUS_PER_TASK × tasks on the node."""
    on_node = env.get("SLURM_CPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return int(on_node)
    per_task = env.get("SLURM_CPUS_PER_TASK", "").strip()
    tasks = (env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1").strip()
    tasks = tasks.split("(")[0]  # SLURM_TASKS_PER_NODE may read "2(x3)": 2 tasks on each of 3 nodes
    if per_task.isdigit() and int(per_task) > 0:
        return int(per_task) * (int(tasks) if tasks.isdigit() else 1)
    return None


def resolve_topology(env: Mapping[str, str], *, nnodes: int | None = None, nproc_per_node: int | None = None,
                     node_rank: int | None = None, master_addr: str | None = None,
                     master_port: int | None = None) -> Topology:
    """Flags (the keyword arguments) first, then torchrun's, the scheduler's and Slurm's environment, then this host."""
    slurm = "SLURM_JOB_ID" in env or any(name in env for name in SLURM_NODELISTS)

    def pick(flag, flag_name, *names):
        if flag is not None:
            return flag, flag_name
        found = _first(env, *names)
        return (None, None) if found is None else (found[1], found[0])

    value, where = pick(nnodes, "--nnodes", "PET_NNODES", "NNODES", *(("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") if slurm else ()))
    nnodes = _int(value, where) if value is not None else 1
    value, where = pick(node_rank, "--node-rank", "PET_NODE_RANK", "NODE_RANK", *(("SLURM_NODEID",) if slurm else ()))
    node_rank = _int(value, where) if value is not None else 0
    value, where = pick(master_port, "--master-port", "PET_MASTER_PORT", "MASTER_PORT")
    port = _int(value, where) if value is not None else None
    value, where = pick(master_addr, "--master-addr", "PET_MASTER_ADDR", "MASTER_ADDR")
    addr = value
    if addr is None and slurm:
        found = _first(env, *SLURM_NODELISTS)
        if found:
            addr = slurm_hosts(found[1], found[0])[0]
    if port is None and slurm and env.get("SLURM_JOB_ID", "").isdigit():
        port = DEFAULT_MASTER_PORT + int(env["SLURM_JOB_ID"]) % 10000  # jobs sharing a node get different ports
    if port is None and (nnodes > 1 or addr is not None):
        port = DEFAULT_MASTER_PORT

    value, where = pick(nproc_per_node, "--nproc-per-node", "PET_NPROC_PER_NODE", "NPROC_PER_NODE")
    if value is None and slurm and env.get("SLURM_GPUS_ON_NODE", "").strip() not in ("", "0"):
        value, where = env["SLURM_GPUS_ON_NODE"].strip(), "SLURM_GPUS_ON_NODE"
    cpu_slots = slurm_cpu_slots(env) if slurm else None
    omp = None
    if value is not None:
        nproc = _int(value, where)
    elif gpus := count_local_gpus(env):
        nproc = gpus
    elif cpu_slots:  # a CPU-only Slurm node: one single-threaded process per allocated CPU
        nproc, omp = cpu_slots, 1
    else:
        nproc = 1
    if omp is None and cpu_slots and "OMP_NUM_THREADS" not in env:
        omp = max(1, cpu_slots // max(nproc, 1))

    if nnodes < 1:
        raise UserError(f"--nnodes={nnodes} must be >= 1")
    if nproc < 1:
        raise UserError(f"--nproc-per-node={nproc} must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank={node_rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and addr is None:
        raise UserError(f"--nnodes={nnodes}: several nodes need --master-addr (the host of node 0), or run under Slurm")
    if port is not None and not 0 < port < 65536:
        raise UserError(f"--master-port={port} must be in 1..65535")
    return Topology(nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank, master_addr=addr, master_port=port,
                    omp_threads=omp)
