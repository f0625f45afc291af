"""Process-group setup with a bounded join and a preflight of the job's shape, and the few collectives the loop needs."""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from bigtrain.errors import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when not distributed
    store: object | None = None  # the job's c10d store the group was made on (the hang watchdog talks over it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str = "auto", *, timeout_s: float = 600, collective_timeout_s: float = 1800) -> Dist:
    """Read the launcher's environment, pick the device, and init the process group when world > 1.

    gloo on CPU; on GPU both, "cuda:nccl,cpu:gloo": device tensors reduce over nccl, CPU tensors over gloo
    (offloaded parameters, and the loop's host values, `all_reduce_host`, which so never wait for the device).
    A single process (no WORLD_SIZE) runs without a process group.
    Joining waits at most timeout_s (`parallel.init_timeout_s`) and is followed by a preflight that checks
    the job's shape on every rank; either failing is a UserError with a one-line diagnosis on every rank
    that got this far. Afterwards collectives may take collective_timeout_s (rank 0 may prepare data for minutes).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = store = None
    if world_size > 1:
        backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
        if not torch_dist.is_initialized():
            kwargs = {"device_id": dev} if use_cuda else {}
            try:  # joining and the preflight are bounded by timeout_s; collectives after by collective_timeout_s
                store = _job_store(rank, world_size, timeout_s)
                views = _exchange_views(store, rank, world_size, timeout_s)
            except (RuntimeError, TimeoutError) as e:  # DistStoreError, DistNetworkError
                raise UserError(_join_failure(rank, world_size, timeout_s, e)) from None
            problem = preflight_problem(views, world_size)
            if problem:
                raise UserError(f"preflight on rank {rank} ({socket.gethostname()}): {problem}")
            torch_dist.init_process_group(backend, store=torch_dist.PrefixStore("bigtrain/pg/", store), rank=rank,
                                          world_size=world_size,
                                          timeout=datetime.timedelta(seconds=collective_timeout_s), **kwargs)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend, store=store)


def _job_store(rank: int, world_size: int, timeout_s: float) -> torch_dist.Store:
    """The job's TCPStore at MASTER_ADDR:MASTER_PORT, as env:// would make it: torchrun's agent hosts it (a
    client here, keys under this restart's prefix), else rank 0 serves it and waits for every rank. Connecting
    and waiting take at most timeout_s (the process group's own timeout is the collectives')."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = torch_dist.TCPStore(addr, port, world_size, False, timeout)
        return torch_dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return torch_dist.TCPStore(addr, port, world_size, rank == 0, timeout, multi_tenant=True)


def _exchange_views(store: torch_dist.Store, rank: int, world_size: int, timeout_s: float) -> list[dict]:
    """Every rank's `_launch_view`, through the store (no process group yet), waiting at most timeout_s."""
    store.set(f"bigtrain/preflight/{rank}", json.dumps(_launch_view(rank)))
    keys = [f"bigtrain/preflight/{r}" for r in range(world_size)]
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    return [json.loads(store.get(key)) for key in keys]


def use_tf32(device: torch.device, enabled: bool) -> None:
    """`parallel.tf32`: on CUDA, fp32 matmuls and cuDNN convolutions may use TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation; what Ampere and later are fast at). Elsewhere nothing changes."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


# --------------------------------------------------------------------------- preflight

# What each launcher tells a process about the job: (nodes, node rank, processes per node) variables.
# torchrun (and accelerate, which runs it) sets GROUP_*/LOCAL_WORLD_SIZE; the deepspeed launcher CROSS_*.
_NODES = ("GROUP_WORLD_SIZE", "CROSS_SIZE")
_NODE_RANK = ("GROUP_RANK", "CROSS_RANK")
_PER_NODE = ("LOCAL_WORLD_SIZE",)


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


def _launch_view(rank: int) -> dict:
    """This process's view of the job, as its launcher set it up."""
    addr = os.environ.get("MASTER_ADDR", "")
    try:
        resolved = socket.gethostbyname(addr) if addr else ""
    except OSError:
        resolved = addr
    return {"rank": rank, "host": socket.gethostname(), "world": int(os.environ.get("WORLD_SIZE", "0")),
            "nodes": _env_int(_NODES), "node": _env_int(_NODE_RANK), "per_node": _env_int(_PER_NODE),
            "master": f"{addr}:{os.environ.get('MASTER_PORT', '')}", "master_ip": f"{resolved}:{os.environ.get('MASTER_PORT', '')}"}


def _who(v: dict) -> str:
    node = f", node {v['node']}" if v["node"] is not None else ""
    return f"rank {v['rank']} ({v['host']}{node})"


def preflight_problem(views: list[dict], world_size: int) -> str | None:
    """The first inconsistency in the ranks' views of the job (same text on every rank), or None."""
    first = views[0]
    for v in views:
        if v["world"] != world_size:
            return f"{_who(v)} was started for {v['world']} processes but {world_size} joined"
    for key, shown, what, flag in (("nodes", "nodes", "{} nodes", "--nnodes"),
                                   ("per_node", "per_node", "{} processes per node", "--nproc-per-node"),
                                   ("master_ip", "master", "master {}", "--master-addr and --master-port")):
        for v in views:
            if v[key] != first[key]:
                return (f"{_who(v)} expects {what.format(v[shown])} but {_who(first)} expects "
                        f"{what.format(first[shown])} — start every node with the same {flag}")
    nodes, per_node = first["nodes"], first["per_node"]
    if nodes is not None and per_node is not None and nodes * per_node != world_size:
        return (f"{world_size} processes joined but every rank expects {nodes} nodes × {per_node} per node = "
                f"{nodes * per_node} — check --nnodes and --nproc-per-node on each node")
    node_ids = {v["node"] for v in views}
    if nodes is not None and None not in node_ids and len(node_ids) != nodes:
        return f"{len(node_ids)} distinct node ranks joined but {nodes} nodes were expected — check --node-rank on each node"
    return None


def _join_failure(rank: int, world_size: int, timeout_s: float, error: BaseException) -> str:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    nodes = _env_int(_NODES)
    return (f"rank {rank} of {world_size} on {socket.gethostname()}: the job did not assemble at master {master} "
            f"within parallel.init_timeout_s={timeout_s:g} s ({reason}) — are all "
            f"{f'{nodes} nodes' if nodes else 'nodes'} started, with the same --nnodes, --master-addr and --master-port?")


def barrier(dist: Dist, group=None) -> None:
    if dist.distributed:
        torch_dist.barrier(group=group)


def all_reduce_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(dist: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_host(dist: Dist, values: list[float]) -> list[float]:
    """The sums over ranks of host numbers, as host numbers: a CPU float64 tensor reduced over gloo (on a GPU
    too), read back through numpy (a CPU tensor's memory: no device work to wait for)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.numpy().tolist()


def all_reduce_max(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Max of a CPU tensor over ranks in place (over gloo; no-op on one process)."""
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_gather_object(dist: Dist, obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank (over `group`: default, all ranks)."""
    if not dist.distributed:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj, group=group)
    return out


def new_background_group():
    """A second gloo group of all ranks, for collectives off the training thread (async checkpoint saves), so
    they never interleave with the loop's on the default group; None without a process group. Collective."""
    return torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None


def shutdown(dist: Dist) -> None:
    """Destroy the process group: torchrun's, or the one-process group FSDP/DeepSpeed make when run alone."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
