"""Process-group setup with a bounded join and a preflight of the job's shape, the few collectives the loop needs,
and rank 0's long work with no collective held open (on_main)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from bigtrain.core.errors import UserError, say


class CollectiveNote:
    """Which of bigtrain's own collectives this process's main thread is in (what, since when), and how many it has
    entered. The hang watchdog reads it from its thread: its report names the operation and size a stuck rank
    waits in, a finished collective is progress (ranks polling rank 0's data preparation are not stalled), and
    the count tells which ranks are behind (not yet in the collective the others wait in). Collectives of other
    threads, and torch's own, are not noted."""

    def __init__(self):
        self.current: tuple[str, float] | None = None  # (e.g. "all_reduce SUM of 3 float64 (24 B)", monotonic start)
        self.entered_count = 0
        self.finished_at = time.monotonic()

    @contextlib.contextmanager
    def entered(self, operation: str, tensor: torch.Tensor | None = None):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        what = operation if tensor is None else (
            f"{operation} of {tensor.numel()} {str(tensor.dtype).removeprefix('torch.')} "
            f"({tensor.numel() * tensor.element_size():,} B) on {tensor.device.type}")
        self.current = (what, time.monotonic())
        self.entered_count += 1
        yield  # an exception leaves `current` set: the watchdog's diagnosis of a timeout names it
        self.current = None
        self.finished_at = time.monotonic()


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when not distributed
    store: object | None = None  # the job's c10d store the group was made on (the hang watchdog talks over it)
    collectives: CollectiveNote = field(default_factory=CollectiveNote, compare=False, repr=False)

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
            kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
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
        with dist.collectives.entered("barrier"):
            torch_dist.barrier(group=group)


def all_reduce_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.distributed:
        with dist.collectives.entered("all_reduce SUM", tensor):
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(dist: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    with dist.collectives.entered("broadcast_object_list from rank 0 (a pickled object)"):
        torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_host(dist: Dist, values: list[float]) -> list[float]:
    """The sums over ranks of host numbers, as host numbers: a CPU float64 tensor reduced over gloo (on a GPU
    too), read back through numpy (a CPU tensor's memory: no device work to wait for)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.distributed:
        with dist.collectives.entered("all_reduce SUM", tensor):
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.numpy().tolist()


def all_reduce_max(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Max of a CPU tensor over ranks in place (over gloo; no-op on one process)."""
    if dist.distributed:
        with dist.collectives.entered("all_reduce MAX", tensor):
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_gather_object(dist: Dist, obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank (over `group`: default, all ranks)."""
    if not dist.distributed:
        return [obj]
    out = [None] * dist.world_size
    with dist.collectives.entered("all_gather_object (a pickled object per rank)"):
        torch_dist.all_gather_object(out, obj, group=group)
    return out


def on_main(dist: Dist, fn, *, what: str = "rank 0's work", poll_s: float = 1.0):
    """Run fn on rank 0 while the others wait; its error is raised on every rank (no hang).

    No collective stays open while fn runs (data preparation or a checkpoint's conversion may take hours): rank 0
    runs it in a thread and every rank meets in a short all-reduce every `poll_s` (each waits poll_s first, so they
    arrive together) until it is done, so fn may take longer than parallel.collective_timeout_s; the waiting ranks
    say so once a minute."""
    if not dist.distributed:
        return fn()
    result, error, failure, done = None, None, None, threading.Event()

    def work():
        nonlocal result, error, failure
        try:
            result = fn()
        except UserError as e:
            error = str(e)
        except BaseException as e:  # re-raised on rank 0; the others get a one-line error
            failure, error = e, f"rank 0 failed during {what}: {type(e).__name__}: {e}"
        finally:
            done.set()

    if dist.is_main:
        threading.Thread(target=work, name="bigtrain-on-main", daemon=True).start()
    start = said = time.monotonic()
    while True:
        if dist.is_main:
            finished = done.wait(timeout=poll_s)
        else:
            time.sleep(poll_s)
            finished = False
        flag = torch.tensor([1.0 if finished else 0.0])
        if all_reduce_max(dist, flag).item() > 0:
            break
        if not dist.is_main and dist.local_rank == 0 and time.monotonic() - said >= 60:
            said = time.monotonic()
            say(f"bigtrain: rank {dist.rank} waiting for {what} on rank 0 ({(said - start) / 60:.0f} min)")
    error = broadcast_object(dist, error)
    if failure is not None:
        raise failure
    if error:
        raise UserError(error)
    return result


def new_background_group():
    """A second gloo group of all ranks, for collectives off the training thread (async checkpoint saves), so
    they never interleave with the loop's on the default group; None without a process group. Collective."""
    return torch_dist.new_group(backend="gloo") if torch_dist.is_initialized() else None


def shutdown(dist: Dist) -> None:
    """Destroy the process group: torchrun's, or the one-process group FSDP/DeepSpeed make when run alone."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
