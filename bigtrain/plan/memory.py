"""The memory plan of a recipe (`bigtrain check`): what one rank holds at its peak, piece by piece.

The pieces, per rank, for AdamW:

- weights: the parameters a rank keeps between steps, in the strategy's parameter dtype (a LoRA base's frozen
  block Linears in the compute dtype under mixed precision): whole (single, ddp, ZeRO-1/2), or its shard (fsdp
  over the shard group, ZeRO-3 over every rank);
- master weights: DeepSpeed's fp32 copy of its partition of the trained parameters (ZeRO keeps one in any
  precision);
- gradients: of the trained parameters only. single: made in backward and freed by the step; ddp: its
  gradient buckets (our gradients are views into them), always there; fsdp: the reduce-scattered shard;
  ZeRO-1: whole, ZeRO-2/3: the partition (a preallocated buffer);
- optimizer state: AdamW's two fp32 moments of the trained parameters, sharded by fsdp and every ZeRO stage;
- buckets: DeepSpeed's gradient reduce buckets (two under ZeRO-1/2, which overlap them, one under ZeRO-3);
- gathered: what a sharded strategy gathers to compute with: fsdp the root's own parameters (embeddings,
  head) for the whole forward and backward plus two blocks (the one running and the one prefetched) and, in
  backward, one block's unsharded gradients; ZeRO-3 its prefetch bucket and live-parameter limit (with selective
  checkpointing also the output projection's weight, which torch's linear keeps gathered from forward to backward);
- autocast copies: single and ddp under bf16/fp16 autocast hold a compute-dtype copy of every weight through
  forward and backward;
- activations: at the optimizer step, AdamW's temporaries off CUDA (two of the size of the tensor it updates:
  the largest parameter, or DeepSpeed's flat partition); otherwise what autograd saves in one micro-batch's forward, plus the backward's working memory. Measured,
  not guessed: one- and two-block copies of the model, every width divided by the same power of two, run a
  forward and backward (the strategy's activation checkpointing applied, the compute dtype's autocast) while
  every tensor storage made is tracked; the block's share and the rest (embeddings, head, loss) are scaled
  back to the recipe's widths and tokens. Dense attention masks (SFT's, document masks off CUDA) are added;
- teacher (distillation, task.teacher): the frozen teacher's weights in the compute dtype, sharded as the
  student's are (fsdp, ZeRO-3) or whole. Its forward runs after the student's, under no_grad, so at the start of
  backward the activations also hold the larger of what it gathers while it runs (fsdp: its root and two blocks;
  ZeRO-3: the prefetch and live limits) plus its logits, and what the KL keeps for backward (the teacher's
  probabilities and the student's log-probabilities, fp32, per position and vocabulary entry);
- runtime: on a CPU, the resident memory libraries take on first use (≈0.1 GB: thread pools, kernel scratch,
  allocator caches), which the peak RSS counts; on CUDA the allocator's peak counts tensors only (the CUDA
  context, ~0.5 GB, comes on top of what either reports).

The peak is the persistent pieces plus the larger of the backward (saved activations, the loss's or a
recomputed block's working memory, gradients made so far) and the optimizer step (all gradients). It is
what `perf/max_memory_gb` measures from the moment the model is built (`bigtrain bench` prints it); the
memory-plan test holds the two within 15% under single, ddp, fsdp and ZeRO-3, with and without checkpointing.
Checkpoint saves (host copies) and eval are outside the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU_RUNTIME_BYTES = 100 * 2**20  # see the module docstring: resident memory of libraries' first use on a CPU
# Tokens of the traced micro-batch (activations scale linearly in tokens): odd, so no width (all even) is ever
# this long, and a storage with a dimension of this length is an activation (or its gradient), never a weight.
TRACE_TOKENS = 61
TRACE_HEAD_DIM = 8  # the traced copy's head width: widths are divided until a head is this narrow


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of each piece (`pieces`, in print order) and the peak they add up to."""

    pieces: dict[str, int]
    peak: int
    notes: tuple[str, ...] = ()

    def lines(self, device_memory_gb: float | None = None) -> list[str]:
        rows = [f"{name:<17} {nbytes / 1e9:8.3f} GB" for name, nbytes in self.pieces.items() if nbytes]
        rows.append(f"{'peak':<17} {self.peak / 1e9:8.3f} GB per rank")
        if device_memory_gb is not None:
            verdict = "fits" if self.fits(device_memory_gb) else "does NOT fit"
            rows.append(f"{verdict} in {device_memory_gb:g} GB ({100 * self.peak / (device_memory_gb * 1e9):.0f}% of it)")
        return rows + list(self.notes)

    def fits(self, device_memory_gb: float) -> bool:
        return self.peak <= device_memory_gb * 1e9


class LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages made under this mode that are still alive, and their peak; only those of
    tensors with a dimension `tokens` long when given (activations, not weights, their casts or gradients)."""

    def __init__(self, tokens: int | None = None):
        super().__init__()
        self.tokens = tokens
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def ignore(self, tensors) -> None:
        """Storages made before (parameters): views of them are not new memory."""
        self._seen.update(t.untyped_storage()._cdata for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.device.type != "meta"
                    and (self.tokens is None or self.tokens in t.shape)):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)


@dataclass(frozen=True)
class Activations:
    """One micro-batch's activation memory at the recipe's sizes, in bytes."""

    saved_per_block: int  # what a block keeps from forward to backward (its input only, under full checkpointing)
    block: int  # what a block keeps without checkpointing: its recompute in backward
    outside: int  # embeddings, final norm, head and loss kept from forward to backward
    backward_extra: int  # the backward's peak above what the forward kept (the loss's gradients, a block's)
    masks: int  # dense attention masks, shared by every block


def _scale(spec) -> int:
    """The power of two every width of the traced copy is divided by."""
    k = 1
    while (spec.head_dim // (2 * k) >= TRACE_HEAD_DIM and all(w % (2 * k) == 0 for w in (spec.d_model, spec.d_ff,
                                                                                        spec.head_dim))):
        k *= 2
    return k


def _traced(spec, n_layers: int, *, k: int, checkpointing: str, param_dtype, compute_dtype, loss_chunk: int,
            tokens: int) -> tuple[int, int]:
    """(bytes alive after forward and loss, peak bytes during backward) of a copy of the model with `n_layers`
    blocks and widths / k, on `tokens` tokens of one sequence: activations and their gradients only (parameters,
    their autocast copies and their gradients are counted at full size by the plan)."""
    from bigtrain.models import _arch_class
    from bigtrain.parallel.transforms import apply_activation_checkpointing

    small = dataclasses.replace(
        spec, n_layers=n_layers, d_model=spec.d_model // k, d_ff=spec.d_ff // k,
        d_head=spec.head_dim // k, vocab_size=max(16, spec.vocab_size // k), max_seq_len=tokens + 3,
        num_labels=spec.num_labels)
    torch.manual_seed(0)
    model = _arch_class(small.arch)(small)
    model.to(param_dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if checkpointing != "none":
        apply_activation_checkpointing(model, checkpointing)
    model.train()
    ids = torch.randint(0, small.vocab_size, (1, tokens))
    autocast = (torch.autocast("cpu", dtype=compute_dtype) if compute_dtype != param_dtype
                else contextlib.nullcontext())
    live = LiveStorages(tokens)
    live.ignore([*model.parameters(), *model.buffers()])
    with live:
        with autocast:
            if small.head == "classify":
                loss = F.cross_entropy(model(ids).float(), torch.zeros(1, dtype=torch.long))
            elif loss_chunk:
                loss = model(ids, labels=ids, loss_chunk=loss_chunk)
            else:
                logits = model(ids)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
                del logits
        forward = live.live
        loss.backward()
    return forward, live.peak


def trace_activations(spec, *, tokens: int, seq_len: int, checkpointing: str, param_dtype, compute_dtype,
                      loss_chunk: int = 0, dense_mask: bool = False) -> Activations:
    """Activations of a micro-batch of `tokens` tokens (sequences of seq_len), measured on width-scaled copies
    of the model (see the module docstring)."""
    k = _scale(spec)
    traced = TRACE_TOKENS
    chunk = max(1, round(loss_chunk * traced / tokens)) if loss_chunk else 0
    common = dict(k=k, param_dtype=param_dtype, compute_dtype=compute_dtype, loss_chunk=chunk, tokens=traced)
    with torch.random.fork_rng(devices=[]):
        fwd1, peak1 = _traced(spec, 1, checkpointing=checkpointing, **common)
        fwd2, _ = _traced(spec, 2, checkpointing=checkpointing, **common)
        plain = fwd2 - fwd1  # a block's whole activations: what checkpointing recomputes in backward
        if checkpointing != "none":
            plain = _traced(spec, 2, checkpointing="none", **common)[0] - _traced(spec, 1, checkpointing="none", **common)[0]
    factor = k * tokens / traced
    saved = fwd2 - fwd1
    masks = 2 * tokens * seq_len if dense_mask else 0  # (B, 1, T, T) bool, and its empty-row fix
    return Activations(saved_per_block=round(saved * factor), block=round(plain * factor),
                       outside=round((fwd1 - saved) * factor), backward_extra=round((peak1 - fwd1) * factor),
                       masks=masks)


def _trained_counts(spec, lora=None) -> tuple[int, int, int, int, int, int]:
    """(all parameters, trained ones, the largest block's, the root's own (outside the blocks), the largest trained
    tensor, the blocks' frozen Linear weights and biases), counted on the model built on the meta device (LoRA
    included: model.lora's `lora`)."""
    from bigtrain.models import _arch_class
    from bigtrain.models.lora import apply_lora

    with torch.device("meta"):
        model = _arch_class(spec.arch)(spec)
    if lora is not None:
        apply_lora(model, lora)
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trained = sum(p.numel() for p in unique if p.requires_grad)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    root = sum(p.numel() for p in unique if id(p) not in in_blocks)
    frozen_linears = sum(p.numel() for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
                         for p in (m.weight, m.bias) if p is not None and not p.requires_grad)
    return total, trained, block, root, max(p.numel() for p in unique if p.requires_grad), frozen_linears


@dataclass(frozen=True)
class _Layout:
    """How a strategy lays the model's state over the ranks: `shards` ranks share what is sharded."""

    strategy: str  # single | ddp | fsdp | deepspeed
    zero: int  # DeepSpeed's ZeRO stage; 0 for the others
    shards: int

    def share(self, n: int) -> int:
        """One rank's share of n elements (rounded up)."""
        return -(-n // self.shards)

    def weights(self, n: int) -> int:
        """The elements of n weights one rank holds: its share where the weights are sharded, else all."""
        return self.share(n) if self.strategy == "fsdp" or self.zero == 3 else n


def plan_memory(cfg, spec, *, world_size: int, table, strategy: str, device_type: str, teacher=None) -> MemoryPlan:
    """The memory plan of training `spec` as the recipe `cfg` says, on `world_size` ranks under `strategy`
    (resolved: single | ddp | fsdp | deepspeed) with the precision `table`; `teacher`: a distillation teacher's
    ModelSpec."""
    p = cfg.parallel
    zero = p.zero_stage if strategy == "deepspeed" else 0
    shards = {"fsdp": p.shard_group_size or world_size, "deepspeed": world_size}.get(strategy, 1)
    layout = _Layout(strategy, zero, shards)
    counts = _trained_counts(spec, getattr(cfg.model, "lora", None))
    state = _state_bytes(cfg, spec, counts, layout, table)
    grads_made = state.pop("gradients made")

    t = cfg.train
    tokens = t.micro_batch_size * cfg.data.seq_len
    dense_mask = cfg.task.name == "sft" or (cfg.data.document_mask and device_type != "cuda")
    acts = trace_activations(spec, tokens=tokens, seq_len=cfg.data.seq_len, checkpointing=p.activation_checkpointing,
                             param_dtype=table.param, compute_dtype=table.compute,
                             loss_chunk=getattr(cfg.task, "loss_chunk_tokens", 0) or 0, dense_mask=dense_mask)
    saved = spec.n_layers * acts.saved_per_block + acts.outside + acts.masks
    teacher_weights = 0
    if teacher is not None:
        teacher_weights, teacher_saved = _teacher_bytes(cfg, teacher, layout, table, tokens, state["gathered"])
        saved += teacher_saved
    accumulating = t.accum_steps(world_size) > 1
    casts = state.pop("autocast copies")
    # (activations, gradients made in backward) at the moments the peak can be: backward's start holds every
    # saved activation and the loss's gradients (and, accumulating, the gradients so far); its end every
    # gradient, the first block's saved input, recompute and working memory; the optimizer step every gradient.
    moments = {
        "the start of backward": (saved + acts.backward_extra, grads_made if accumulating else 0, casts),
        "the end of backward": (acts.saved_per_block + 2 * acts.block + acts.masks, grads_made, casts),
        "the optimizer step": (_step_temporaries(counts, layout, table, device_type), grads_made, 0),
    }
    when = max(moments, key=lambda m: sum(moments[m]))
    activations, grads_then, casts_then = moments[when]
    pieces = {
        "weights": state["weights"], "master weights": state["master weights"],
        "gradients": state["gradients"] + grads_then, "optimizer state": state["optimizer state"],
        "buckets": state["buckets"], "gathered": state["gathered"], "autocast copies": casts_then,
        "teacher": teacher_weights, "activations": activations,
        "runtime": CPU_RUNTIME_BYTES if device_type == "cpu" else 0,
    }
    notes = [f"the peak comes at {when}"]
    for name in _offloaded(p, strategy):
        notes.append(f"{name}: offloaded to host memory ({pieces[name] / 1e9:.3f} GB there, not counted)")
        pieces[name] = 0
    return MemoryPlan(pieces, sum(pieces.values()), tuple(notes))


def _state_bytes(cfg, spec, counts, layout: _Layout, table) -> dict[str, int]:
    """Bytes per rank of the training state: weights, master weights, optimizer state, the gradients kept between
    steps and those made in backward and freed by the step, DeepSpeed's buckets, what is gathered while a block
    runs, and autocast's copies."""
    from bigtrain.parallel.deepspeed_config import _sized_to_model

    total, trained, block, root, _, frozen = counts
    param_b, compute_b, grad_b = table.param.itemsize, table.compute.itemsize, table.grad_accum.itemsize
    strategy, zero, share = layout.strategy, layout.zero, layout.share
    # Mixed precision holds a LoRA base's frozen block Linears in the compute dtype (single, ddp, fsdp).
    frozen = frozen if strategy != "deepspeed" and table.compute != table.param else 0
    weights = sum(layout.weights(n) * nbytes for n, nbytes in ((total - frozen, param_b), (frozen, compute_b)))
    master = share(trained) * 4 if strategy == "deepspeed" else 0
    optimizer = 2 * share(trained) * table.optimizer_state.itemsize
    grads_kept, grads_made = 0, 0  # always there | made in backward, freed by the step
    buckets = gathered = 0
    # single/ddp under mixed precision: autocast keeps a compute-dtype copy of every weight from its first use in
    # forward to the end of backward (fsdp gathers in the compute dtype, DeepSpeed casts the module itself).
    casts = (total - frozen) * compute_b if strategy in ("single", "ddp") and table.compute != table.param else 0
    if strategy == "single":
        grads_made = trained * grad_b
    elif strategy == "ddp":
        grads_kept = trained * grad_b
    elif strategy == "fsdp":
        grads_made = share(trained) * grad_b
        gathered = root * compute_b + 2 * block * compute_b + block * table.grad_reduce.itemsize
    else:
        limits = _sized_to_model(total)
        bucket = limits["zero_optimization.reduce_bucket_size"]
        if zero == 3:
            grads_kept = share(trained) * grad_b
            buckets = bucket * param_b
            gathered = (min(total, limits["zero_optimization.stage3_prefetch_bucket_size"])
                        + min(total, limits["zero_optimization.stage3_max_live_parameters"])) * compute_b
            # torch's linear under selective checkpointing: the head's gathered weight stays saved
            if cfg.parallel.activation_checkpointing == "selective":
                gathered += spec.vocab_size * spec.d_model * compute_b
        else:
            grads_kept = (share(trained) * 4) if zero == 2 else trained * param_b
            buckets = 2 * bucket * param_b
    return {"weights": weights, "master weights": master, "optimizer state": optimizer, "gradients": grads_kept,
            "gradients made": grads_made, "buckets": buckets, "gathered": gathered, "autocast copies": casts}


def _offloaded(p, strategy: str) -> list[str]:
    """The pieces the recipe offloads to host memory (not counted on the device)."""
    offloaded = []
    if strategy == "fsdp" and p.offload_params == "cpu":
        offloaded = ["weights", "gradients", "optimizer state"]
    if strategy == "deepspeed" and p.offload_optimizer != "none":
        offloaded = ["master weights", "optimizer state"]
    if strategy == "deepspeed" and p.offload_params != "none":
        offloaded.append("weights")
    return offloaded


def _step_temporaries(counts, layout: _Layout, table, device_type: str) -> int:
    """AdamW's step: fused on CUDA (no temporaries); elsewhere a tensor at a time, with two temporaries the size of
    the tensor it updates: a parameter (its shard under fsdp), or under DeepSpeed the rank's whole flat partition."""
    if device_type == "cuda":
        return 0
    _, trained, _, _, largest, _ = counts
    strategy = layout.strategy
    updated = {"deepspeed": layout.share(trained), "fsdp": layout.share(largest)}.get(strategy, largest)
    return 2 * updated * table.optimizer_state.itemsize


def _teacher_bytes(cfg, teacher, layout: _Layout, table, tokens: int, gathered: int) -> tuple[int, int]:
    """(its weights, what it adds to the saved activations) of a distillation teacher: its forward's gathered
    weights and logits, or the KL's saved fp32 tensors, whichever is more."""
    compute_b = table.compute.itemsize
    n, _, t_block, t_root, _, _ = _trained_counts(teacher)
    weights = layout.weights(n) * compute_b
    classify = cfg.task.data_task == "classification"  # one position per example, over its labels
    t = cfg.train
    positions, classes = (t.micro_batch_size, teacher.num_labels or 2) if classify else (tokens, teacher.vocab_size)
    forward = 0
    if layout.strategy == "fsdp":  # its root and two blocks gathered while it runs
        forward = (t_root + 2 * t_block) * compute_b
    elif layout.zero == 3:
        forward = gathered
    forward += positions * classes * compute_b  # its logits, then the KL's saved fp32 tensors
    return weights, max(forward, 2 * positions * classes * 4)
