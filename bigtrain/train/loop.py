"""The training loop: read it top to bottom.

Each optimizer step: set the LR, fetch this rank's micro-batches, count the step's target tokens
across all ranks, accumulate gradients (syncing only on the last micro-batch), clip, step (or
skip a non-finite step everywhere), then maybe log, evaluate and checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bigtrain.checkpoint import TrainState
from bigtrain.data import GlobalSampler, eval_busiest_count, eval_indices
from bigtrain.parallel.ema import ema_weights
from bigtrain.eval.report import report_eval
from bigtrain.metrics import PeakMemory, StepTimer, mfu
from bigtrain.train.optim import lr_at, set_lr
from bigtrain.train.preempt import Preempted, PreemptionGuard
from bigtrain.parallel import all_reduce_host, all_reduce_sum
from bigtrain.tasks import EVAL_KEY_OFFSET
from bigtrain.train.watchdog import Progress


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite steps in a row); exit code 1."""


@dataclass
class LoopContext:
    """What the loop needs from run.py, built once in the build order run.py writes out."""

    cfg: object  # bigtrain.config.Config
    dist: object  # bigtrain.parallel.Dist
    engine: object  # bigtrain.parallel.Engine
    task: object  # bigtrain.tasks.Task
    train_data: object  # indexable dataset of token arrays
    val_data: object
    logger: object  # bigtrain.metrics.MetricsLogger
    flops_per_token: float
    peak_flops_per_sec: float  # of one device
    raise_peak: Callable[[float], float] | None = None  # a run beat the peak (it was wrong): the corrected peak
    save_checkpoint: Callable | None = None  # save_checkpoint(state, sync=False) -> Path (async: durable by the next)
    bench: bool = False  # time forward/backward and optimizer separately; no eval, no checkpoints
    preempt: PreemptionGuard | None = None  # a signal there: checkpoint at the next step boundary and stop
    progress: Progress = field(default_factory=Progress)  # where the loop is, for the hang watchdog (watchdog.py)
    history: list = field(default_factory=list)  # logged training records (bench reads them)
    lm_eval: Callable | None = None  # eval.tasks: lm_eval_adapter.InLoopTasks, run by evaluate (collective)
    state: TrainState | None = None  # the final state, once train() returns
    memory: PeakMemory | None = None  # peak memory since the model was built (perf/max_memory_gb)


def train(ctx: LoopContext, state: TrainState) -> TrainState:
    cfg, dist, engine, task = ctx.cfg, ctx.dist, ctx.engine, ctx.task
    device, progress = dist.device, ctx.progress
    sampler = GlobalSampler(len(ctx.train_data), seed=cfg.run.seed, global_batch_size=cfg.train.global_batch_size,
                            micro_batch_size=cfg.train.micro_batch_size, rank=dist.rank, world_size=dist.world_size,
                            ordered=getattr(ctx.train_data, "ordered", False))  # a mixture orders its own samples
    end_step = cfg.train.stop_at_step or cfg.train.max_steps
    timer = StepTimer()
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "fwd_bwd_s": 0.0, "optim_s": 0.0}
    engine.model.train()
    saved_step = state.step  # resumed from (or nothing to save at step 0)
    records = StepRecords()
    if not len(ctx.val_data) and not ctx.bench:  # an empty split would log eval/loss 0, ppl 1: no eval at all
        ctx.logger.message("warning: the validation split is empty (data.validation_split=0?) — training without eval")

    with Prefetch(lambda consumed: fetch_micro_batches(ctx, sampler, consumed), device) as batches_at:
        while state.step < end_step:
            step = state.step + 1
            lr = lr_at(cfg.optim, step, cfg.train.max_steps)
            set_lr(engine.optimizer, lr)
            timer.start_step()
            progress.start_step(step)

            with timer.data_wait():  # only as long as the batches made during the last step are late
                batches = batches_at.get(state.samples_consumed)
            if step < end_step:
                batches_at.ahead(state.samples_consumed + cfg.train.global_batch_size)
            # Normalise by the whole step's target count (all ranks, all micro-batches): the loss contract (tasks.py).
            # DDP averages gradients over ranks, hence the world_size factor. The counts were made on the host with
            # the batches; their all-reduce (host numbers, over gloo on a GPU too: it never waits for the device)
            # carries the preemption flag, so every rank stops at the same step when any rank got a signal.
            local = [sum(task.count_targets(b) for b in batches), sum(b["num_tokens"] for b in batches),
                     float(ctx.preempt is not None and ctx.preempt.requested)]
            progress.enter("all-reduce target counts")
            targets, tokens, stop = (int(x) for x in all_reduce_host(dist, local))
            if stop:
                stop_for_preemption(ctx, state, saved_step, records, window)
            scale = dist.world_size / max(targets, 1)

            t0 = time.perf_counter()
            loss_sum = accumulate_gradients(engine, task, batches, scale, progress)
            progress.enter("clip gradients")
            grad_norm = engine.clip_grad_norm(cfg.optim.grad_clip)
            progress.enter("all-reduce loss")
            step_loss = all_reduce_sum(dist, loss_sum).double() / max(targets, 1)
            t1 = time.perf_counter()

            # A non-finite loss or gradient is the same on every rank (loss all-reduced, grads synced): skip together.
            # Loss, norm and flag stay on the device: the engine skips there where its optimizer can (fused AdamW),
            # else reads the flag (the step's one host sync); `records` reads the rest at log and checkpoint steps.
            finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
            records.add(step, step_loss, grad_norm, finite, engine.step_loss_scale())
            progress.enter("optimizer step")
            engine.step(finite)
            if ctx.bench and device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            state.step = step
            state.samples_consumed += cfg.train.global_batch_size
            step_time_s = timer.end_step()
            progress.end_step()
            if ctx.preempt is not None:
                ctx.preempt.unsaved = True  # a signal now waits for the next boundary's checkpoint (preempt.py)

            window["tokens"] += tokens  # non-padding input tokens of the whole job
            window["fwd_bwd_s"] += t1 - t0
            window["optim_s"] += t2 - t1
            log_now = step % cfg.logging.every == 0 or step == end_step
            save_now = not ctx.bench and ((cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == end_step)
            if log_now or save_now:  # the host reads the steps since the last: skips counted, losses summed
                records.settle(cfg, state, window)
            ctx.logger.progress(step, loss=records.last_loss if log_now or save_now else None, lr=lr,
                                tokens_per_sec=tokens / max(step_time_s, 1e-9))

            if log_now:
                _log_train(ctx, state, window, timer.window(), lr, records.last_grad_norm)
                window = dict.fromkeys(window, 0)
            if ctx.bench:
                continue
            if ((cfg.eval.every and step % cfg.eval.every == 0) or step == end_step) and len(ctx.val_data):
                # A preemption signal during eval ends it early on every rank; this step is then checkpointed.
                metrics = evaluate(ctx, stoppable=ctx.preempt is not None)
                if metrics is None:
                    stop_for_preemption(ctx, state, saved_step, records, window)
                else:  # scalars to metrics.jsonl; a classification report to eval/step-N.json (rank 0)
                    report_eval(ctx.logger, step, metrics, run_dir=cfg.run_dir() if dist.is_main else None)
                    ctx.logger.write_curves()  # RUN/curves.png redrawn from metrics.jsonl (rank 0; never stops training)
            if save_now:
                state.wandb_run_id = ctx.logger.wandb_run_id
                progress.enter("checkpoint save")
                ctx.save_checkpoint(state)
                saved_step = step
    return state


def stop_for_preemption(ctx: LoopContext, state: TrainState, saved_step: int, records: StepRecords,
                        window: dict) -> None:
    """Every rank agreed to stop here: checkpoint the steps since the last save (synchronously) and raise Preempted."""
    ctx.preempt.at_boundary()
    if state.step != saved_step:
        records.settle(ctx.cfg, state, window)
        state.wandb_run_id = ctx.logger.wandb_run_id
        ctx.progress.enter("checkpoint save (preemption)")
        ctx.save_checkpoint(state, sync=True)  # durable before the exit (75), whatever async_save says
    raise Preempted(ctx.preempt.signal_name or "a signal to another rank", state.step)


class Prefetch:
    """The next step's micro-batches made on a thread of their own while this step runs: `ahead(position)`
    starts them, `get(position)` returns them (or makes them now, if another position was asked for). They
    are what `fetch(position)` gives, a function of the position only: the same batches in the same order,
    so resume and preemption stop and start at a step boundary as before (a batch made ahead for a step
    that never runs is dropped).

    On CUDA, `fetch` gives host tensors; the thread pins them and issues their copies to `device` on a stream of
    its own, so the copy of step N+1's input overlaps step N's kernels instead of queueing behind them (a copy
    from pageable memory also blocks the thread until it is done). `get` makes the compute stream wait for those
    copies (an event, not a host sync) and marks the tensors as used there, so their memory is not reused early."""

    def __init__(self, fetch: Callable[[int], list[dict]], device: torch.device | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.fetch, self.device = fetch, device
        self.copies = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigtrain-batches")
        self.pending: tuple[int, object] | None = None  # (position, Future)

    def _make(self, position: int) -> tuple[list[dict], object]:
        batches = self.fetch(position)
        if self.copies is None:
            return batches, None
        with torch.cuda.stream(self.copies):
            moved = [{k: v.pin_memory().to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                      for k, v in batch.items()} for batch in batches]
        return moved, self.copies.record_event()

    def ahead(self, position: int) -> None:
        self.pending = (position, self.pool.submit(self._make, position))

    def get(self, position: int) -> list[dict]:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == position:
            batches, copied = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()  # made for a step that will not run (if it has not started yet)
            batches, copied = self._make(position)
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for batch in batches:
                for value in batch.values():
                    if isinstance(value, torch.Tensor):
                        value.record_stream(compute)
        return batches

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def fetch_micro_batches(ctx: LoopContext, sampler: GlobalSampler, consumed: int) -> list[dict]:
    """This rank's collated micro-batches of the global batch starting at position `consumed`: on the device, or
    on the host when it is CUDA (Prefetch copies them). Each sample's key for the task is its global position in
    the training order."""
    micro = ctx.cfg.train.micro_batch_size
    first = consumed + ctx.dist.rank * (ctx.cfg.train.global_batch_size // ctx.dist.world_size)
    device = torch.device("cpu") if ctx.dist.device.type == "cuda" else ctx.dist.device
    return [ctx.task.collate([ctx.train_data[int(i)] for i in indices], range(first + j * micro, first + (j + 1) * micro),
                             device)
            for j, indices in enumerate(sampler.rank_micro_batches(consumed))]


def accumulate_gradients(engine, task, batches: list[dict], scale: float, progress: Progress | None = None) -> torch.Tensor:
    """Forward/backward every micro-batch, all-reducing gradients only on the last; returns the summed loss."""
    loss_sum = torch.zeros((), device=engine.dist.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with engine.no_sync(sync=last):
            if progress is not None:
                progress.enter(f"forward {i + 1}/{len(batches)}")
            with engine.autocast():
                loss = task.loss_sum(engine.model, batch)
            if progress is not None:
                progress.enter(f"backward {i + 1}/{len(batches)}" + (" + gradient all-reduce" if last else ""))
            engine.backward(loss * scale)
        loss_sum += loss.detach().float()
    return loss_sum


class StepRecords:
    """Each step's loss, gradient norm, finite flag and loss scale, kept as the (device) tensors they are until
    `settle` reads them on the host, at log and checkpoint steps: a step that logs nothing reads none of them."""

    def __init__(self):
        self.pending: list[tuple] = []
        self.last_loss = self.last_grad_norm = float("nan")

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor, loss_scale) -> None:
        self.pending.append((step, loss, grad_norm, finite, loss_scale))

    def settle(self, cfg, state: TrainState, window: dict) -> None:
        """Read the pending steps in order: count the skipped ones (a TrainingError after too many in a row, naming
        the step) and add the finite ones' losses to the log window."""
        pending, self.pending = self.pending, []
        for step, loss, grad_norm, finite, loss_scale in pending:
            loss, grad_norm, finite = float(loss), float(grad_norm), bool(finite)
            _count_skip(cfg, state, finite, loss, grad_norm, None if loss_scale is None else float(loss_scale), step=step)
            window["loss"] += loss if finite else 0.0
            window["steps"] += 1 if finite else 0
            self.last_loss, self.last_grad_norm = loss, grad_norm


def _count_skip(cfg, state: TrainState, finite: bool, loss: float, grad_norm: float, loss_scale: float | None,
                step: int | None = None) -> None:
    """Count skipped steps; fail after max_skipped_steps in a row (at `step`, default state.step). An fp16 overflow
    with a finite loss is the loss scaler doing its job (it backs off) and only counts against the limit once the
    scale is < 1."""
    if finite:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    scaler_overflow = loss_scale is not None and math.isfinite(loss) and loss_scale >= 1.0
    if not scaler_overflow:
        state.consecutive_skips += 1
    if state.consecutive_skips >= cfg.train.max_skipped_steps:
        raise TrainingError(
            f"{state.consecutive_skips} non-finite steps in a row (step {step or state.step}: loss={loss}, grad_norm={grad_norm}) "
            f"— lower optim.lr, use parallel.precision=bf16, or check the data; train.max_skipped_steps="
            f"{cfg.train.max_skipped_steps}")


def _log_train(ctx: LoopContext, state: TrainState, window: dict, times: dict, lr: float, grad_norm: float) -> None:
    time_s = max(times["time_s"], 1e-9)
    tokens_per_sec = window["tokens"] / time_s
    achieved_per_device = ctx.flops_per_token * tokens_per_sec / ctx.dist.world_size
    if achieved_per_device > ctx.peak_flops_per_sec and ctx.raise_peak is not None:  # MFU above 1 is never true
        ctx.peak_flops_per_sec = ctx.raise_peak(achieved_per_device)
    metrics = {
        "train/loss": window["loss"] / window["steps"] if window["steps"] else float("nan"),
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/skipped_steps": state.skipped_steps,
        "train/samples_consumed": state.samples_consumed,
        "perf/tokens_per_sec": tokens_per_sec,
        "perf/mfu": mfu(ctx.flops_per_token, tokens_per_sec, ctx.peak_flops_per_sec * ctx.dist.world_size),
        "perf/step_time_s": times["step_time_s"],
        "perf/data_wait_frac": times["data_wait_s"] / time_s,
        "perf/max_memory_gb": ctx.memory.gb() if ctx.memory else 0.0,
    }
    if ctx.bench:
        metrics["perf/fwd_bwd_s"] = window["fwd_bwd_s"] / max(times["steps"], 1)
        metrics["perf/optim_s"] = window["optim_s"] / max(times["steps"], 1)
    if ctx.engine.loss_scale is not None:
        metrics["train/loss_scale"] = ctx.engine.loss_scale
    if ctx.cfg.parallel.compile:  # graphs compiled so far: flat after the first steps, or shapes recompile
        metrics["perf/compiled_graphs"] = compiled_graphs()
    if hasattr(ctx.train_data, "metrics"):  # a mixture: what each source has given so far
        metrics.update(ctx.train_data.metrics(state.samples_consumed))
    ctx.logger.log(state.step, metrics)
    ctx.history.append({"step": state.step, **metrics})


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (each recompile for a new shape is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _EvalAbandoned(Exception):
    """Every rank got to the same eval.tasks forward with a preemption signal somewhere: stop scoring."""


def preemption_agreed(ctx: LoopContext) -> bool:
    """Whether any rank got a preemption signal (one host all-reduce; every rank calls it at the same point)."""
    return bool(all_reduce_host(ctx.dist, [float(ctx.preempt.requested)])[0])


def evaluate(ctx: LoopContext, stoppable: bool = False) -> dict[str, float] | None:
    """Task metrics on the validation split (of the EMA weights with eval.use_ema); each rank takes a disjoint
    chunk (no padded duplicates). A mixture's sources are scored one after the other, each split among the ranks,
    and each source's loss is logged too (eval/loss/<source>). `stoppable`: before each batch the ranks agree
    (one all-reduce) whether any got a preemption signal; if so, eval is abandoned on every rank at the same
    batch and None is returned."""
    with ema_weights(ctx.engine, ctx.cfg.eval.use_ema):
        return _evaluate(ctx, stoppable)


def eval_positions(val_data, limit: int | None) -> dict[str | None, np.ndarray]:
    """The validation positions eval scores (the first `limit`), by source: a mixture's (data/mixture.py
    InterleavedSamples: every source alike) under each source's name, one source's under None."""
    if hasattr(val_data, "positions"):
        return val_data.positions(limit)
    return {None: np.arange(len(val_data) if limit is None else min(limit, len(val_data)), dtype=np.int64)}


@torch.no_grad()
def _evaluate(ctx: LoopContext, stoppable: bool) -> dict[str, float] | None:
    cfg, dist, task, model = ctx.cfg, ctx.dist, ctx.task, ctx.engine.module
    groups = eval_positions(ctx.val_data, cfg.eval.max_samples)
    # Ranks' chunks of a group differ by at most one sample, so a rank may have one batch fewer. A sharded model's
    # forward is collective (FSDP/ZeRO-3 all-gather parameters), so every rank runs as many forwards as the
    # busiest one; a rank out of samples runs a spare one-sample batch and discards it.
    plan = [(name, positions[eval_indices(len(positions), dist.rank, dist.world_size)],
             eval_busiest_count(len(positions), dist.world_size)) for name, positions in groups.items()]
    batch_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    batches = sum(-(-busiest // batch_size) for _, _, busiest in plan)
    was_training = model.training
    model.eval()
    sums = {name: dict.fromkeys(task.eval_keys, 0.0) for name in groups}
    done = 0
    for name, mine, busiest in plan:
        for start in range(0, busiest, batch_size):
            done += 1
            ctx.progress.enter(f"eval batch {done}/{batches}")  # the same on every rank
            if stoppable and preemption_agreed(ctx):
                model.train(was_training)
                return None
            chunk = mine[start:start + batch_size]
            spare = len(chunk) == 0
            if spare:
                chunk = np.zeros(1, dtype=np.int64)
            batch = task.collate([ctx.val_data[int(i)] for i in chunk], [EVAL_KEY_OFFSET + int(i) for i in chunk],
                                 dist.device)
            with ctx.engine.autocast():
                batch_sums = task.eval_sums(model, batch)
            if not spare:
                for key, value in batch_sums.items():
                    sums[name][key] += value
    # Sums and counts of every source all-reduced at once: each loss is a global sum over the global target count.
    local = [sums[name][key] for name in groups for key in task.eval_keys]
    totals = all_reduce_sum(dist, torch.tensor(local, dtype=torch.float64, device=dist.device)).tolist()
    width = len(task.eval_keys)
    reduced = {name: dict(zip(task.eval_keys, totals[i * width:(i + 1) * width])) for i, name in enumerate(groups)}
    metrics = task.eval_metrics({key: sum(part[key] for part in reduced.values()) for key in task.eval_keys})
    metrics.update({f"eval/loss/{name}": task.eval_metrics(part)["eval/loss"]
                    for name, part in reduced.items() if name is not None})
    if ctx.lm_eval is not None:  # eval.tasks: lm-eval's scores of the same model, every rank a share

        def forward_context():  # each forward is a phase: a long task is progress, not a hang
            ctx.progress.enter("eval.tasks forward")
            # every rank runs as many forwards (padded to the busiest: a sharded forward is collective), so the
            # ranks agree here, at the same forward, to abandon the tasks on a preemption signal
            if stoppable and preemption_agreed(ctx):
                raise _EvalAbandoned
            return ctx.engine.autocast()

        try:
            metrics.update(ctx.lm_eval(model, forward_context))
        except _EvalAbandoned:
            model.train(was_training)
            return None
    model.train(was_training)
    return metrics
