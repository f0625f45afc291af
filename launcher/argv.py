"""The command line that starts `python -m bigtrain train RECIPE overrides` in every process of this node.

torchrun: one node without a named master uses the c10d rendezvous on a free local port (`--standalone`);
several nodes (or a named master) use the static rendezvous at `--master_addr/--master_port` with
`--node_rank`, because torchrun's c10d backend ignores `--node_rank` and would number nodes by arrival.
deepspeed: its launcher on every node; several nodes use `--no_ssh --node_rank` and a hostfile of placeholders. accelerate: `accelerate launch`
with `--multi_gpu` (a torchrun underneath; on CPU too) and the recipe's precision as `--mixed_precision`.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Callable

from launcher.topology import DEFAULT_MASTER_PORT, Topology


def executable(name: str) -> str:
    """The launcher's console script next to this Python (same environment), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(topo: Topology, train: list[str], *, timeout_s: float) -> list[str]:
    argv = [executable("torchrun")]
    if topo.static:
        argv += ["--nnodes", str(topo.nnodes), "--nproc_per_node", str(topo.nproc_per_node),
                 "--node_rank", str(topo.node_rank), "--rdzv_backend", "static",
                 "--master_addr", topo.master_addr or "127.0.0.1",
                 "--master_port", str(topo.master_port or DEFAULT_MASTER_PORT),
                 "--rdzv_conf", f"timeout={int(timeout_s)}"]  # the agents' wait for each other, like init_timeout_s
    else:
        argv += ["--standalone", "--nnodes", "1", "--nproc_per_node", str(topo.nproc_per_node)]
    return argv + ["-m", "bigtrain", *train]


def deepspeed_hostfile(topo: Topology) -> str:
    """The MPI-style hostfile the deepspeed runner needs for several nodes. With --no_ssh it only counts
    nodes and slots (node i is line i), so the names are placeholders. A new private file (mode 0600,
    created exclusively) each time: a fixed name in the shared temp dir could be planted by another user."""
    fd, path = tempfile.mkstemp(prefix=f"bigtrain-hostfile-{topo.nnodes}x{topo.nproc_per_node}-")
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"node-{i} slots={topo.nproc_per_node}\n" for i in range(topo.nnodes)))
    return path


def deepspeed_argv(topo: Topology, train: list[str], *, timeout_s: float) -> list[str]:
    argv = [executable("deepspeed"), "--num_gpus", str(topo.nproc_per_node)]
    if topo.nnodes > 1:  # every node starts its own processes (no pdsh/ssh): node rank, nodes, slots from a hostfile
        argv += ["--no_ssh", "--hostfile", deepspeed_hostfile(topo), "--num_nodes", str(topo.nnodes),
                 "--node_rank", str(topo.node_rank)]
    if topo.master_addr:
        argv += ["--master_addr", topo.master_addr]
    argv += ["--master_port", str(topo.master_port or free_port())]
    return argv + ["--module", "bigtrain", *train]


def accelerate_argv(topo: Topology, train: list[str], *, timeout_s: float, precision: str = "auto") -> list[str]:
    argv = [executable("accelerate"), "launch"]
    if topo.world_size > 1:
        argv.append("--multi_gpu")
    argv += ["--num_processes", str(topo.world_size), "--num_machines", str(topo.nnodes),
             "--machine_rank", str(topo.node_rank)]
    if topo.master_addr:
        argv += ["--main_process_ip", topo.master_addr]
    if topo.world_size > 1:
        argv += ["--main_process_port", str(topo.master_port or free_port())]
    # fp32 and auto go as accelerate's "no", which leaves the choice to the recipe (auto: from the hardware).
    argv += ["--mixed_precision", {"bf16": "bf16", "bf16-pure": "bf16", "fp16": "fp16"}.get(precision, "no"),
             "--dynamo_backend", "no"]
    return argv + ["-m", "bigtrain", *train]


LAUNCHERS: dict[str, Callable[..., list[str]]] = {
    "torchrun": torchrun_argv,
    "deepspeed": deepspeed_argv,
    "accelerate": accelerate_argv,
}
