"""The training loop: read it top to bottom.

Each optimizer step: set the LR, fetch this rank's micro-batches, count the step's target tokens
across all ranks, accumulate gradients (syncing only on the last micro-batch), clip, step (or
skip a non-finite step everywhere), then maybe log, evaluate and checkpoint.

Beside it: what it is given (context.py), its batches (batches.py), the step's accounting and log
lines (accounting.py), eval (evaluate.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from bigtrain.metrics import StepTimer
from bigtrain.parallel import all_reduce_host, all_reduce_sum
from bigtrain.train.accounting import StepRecords, log_train, new_window
from bigtrain.train.batches import Prefetch, fetch_micro_batches, rank_sampler
from bigtrain.train.evaluate import evaluate_and_report
from bigtrain.train.optim import lr_at, set_lr
from bigtrain.train.preempt import Preempted

if TYPE_CHECKING:
    from bigtrain.checkpoint import TrainState
    from bigtrain.parallel import Engine
    from bigtrain.tasks import Task
    from bigtrain.train.context import LoopContext
    from bigtrain.train.watchdog import Progress


def train(ctx: LoopContext, state: TrainState) -> TrainState:
    """Train from `state` to train.stop_at_step (else train.max_steps); returns the final state."""
    cfg, engine, progress = ctx.cfg, ctx.engine, ctx.progress
    sampler = rank_sampler(ctx)
    end_step = cfg.train.stop_at_step or cfg.train.max_steps
    timer, records, window = StepTimer(), StepRecords(), new_window()
    engine.model.train()
    saved_step = state.step  # resumed from (or nothing to save at step 0)
    if not len(ctx.val_data) and not ctx.bench:  # an empty split would log eval/loss 0, ppl 1: no eval at all
        ctx.log.message("warning: the validation split is empty (data.validation_split=0?) — training without eval")

    with Prefetch(lambda consumed: fetch_micro_batches(ctx, sampler, consumed), ctx.dist.device) as batches_at:
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
            targets, tokens, stop = count_step(ctx, batches)
            if stop:  # a signal on some rank: every rank checkpoints and stops at this step
                stop_for_preemption(ctx, state, saved_step, records, window)

            t0 = time.perf_counter()
            step_loss, grad_norm = forward_backward(ctx, batches, targets)  # scalars, left on the device
            t1 = time.perf_counter()
            optimizer_step(ctx, records, step, step_loss, grad_norm)
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
            ctx.log.progress(step, loss=records.last_loss if log_now or save_now else None, lr=lr,
                                tokens_per_sec=tokens / max(step_time_s, 1e-9))
            if log_now:
                log_train(ctx, state, window, timer.window(), lr, records.last_grad_norm)
                window = new_window()
            if ctx.bench:
                continue
            eval_now = ((cfg.eval.every and step % cfg.eval.every == 0) or step == end_step) and len(ctx.val_data)
            if eval_now and not evaluate_and_report(ctx, step):  # a signal ended eval early on every rank
                stop_for_preemption(ctx, state, saved_step, records, window)  # this step is checkpointed
            if save_now:
                save(ctx, state, "checkpoint save")
                saved_step = step
    return state


def count_step(ctx: LoopContext, batches: list[dict]) -> tuple[int, int, bool]:
    """The whole step's target and input-token counts (all ranks, all micro-batches), and whether any rank got a
    preemption signal."""
    # Normalise by the whole step's target count (all ranks, all micro-batches): the loss contract (tasks.py).
    # The counts were made on the host with the batches; their all-reduce (host numbers, over gloo on a GPU too:
    # it never waits for the device) carries the preemption flag, so every rank stops at the same step when any
    # rank got a signal.
    local = [sum(ctx.task.count_targets(b) for b in batches), sum(b["num_tokens"] for b in batches),
             float(ctx.preempt is not None and ctx.preempt.requested)]
    ctx.progress.enter("all-reduce target counts")
    targets, tokens, stop = (int(x) for x in all_reduce_host(ctx.dist, local))
    return targets, tokens, bool(stop)


def forward_backward(ctx: LoopContext, batches: list[dict], targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the step's mean loss over its `targets` (all ranks), clipped: (loss, gradient norm)."""
    scale = ctx.dist.world_size / max(targets, 1)  # DDP averages gradients over ranks, hence the world_size factor
    loss_sum = accumulate_gradients(ctx.engine, ctx.task, batches, scale, ctx.progress)
    ctx.progress.enter("clip gradients")
    grad_norm = ctx.engine.clip_grad_norm(ctx.cfg.optim.grad_clip)
    ctx.progress.enter("all-reduce loss")
    step_loss = all_reduce_sum(ctx.dist, loss_sum).double() / max(targets, 1)
    return step_loss, grad_norm


def optimizer_step(ctx: LoopContext, records: StepRecords, step: int, step_loss: torch.Tensor,
                   grad_norm: torch.Tensor) -> None:
    """Step the optimizer, or skip a non-finite step on every rank."""
    # A non-finite loss or gradient is the same on every rank (loss all-reduced, grads synced): skip together.
    # Loss, norm and flag stay on the device: the engine skips there where its optimizer can (fused AdamW),
    # else reads the flag (the step's one host sync); `records` reads the rest at log and checkpoint steps.
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    records.add(step, step_loss, grad_norm, finite, ctx.engine.step_loss_scale())
    ctx.progress.enter("optimizer step")
    ctx.engine.step(finite)
    if ctx.bench and ctx.dist.device.type == "cuda":
        torch.cuda.synchronize(ctx.dist.device)


def accumulate_gradients(engine: Engine, task: Task, batches: list[dict], scale: float,
                         progress: Progress | None = None) -> torch.Tensor:
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


def stop_for_preemption(ctx: LoopContext, state: TrainState, saved_step: int, records: StepRecords,
                        window: dict) -> None:
    """Every rank agreed to stop here: checkpoint the steps since the last save (synchronously) and raise Preempted."""
    preempt = ctx.preempt
    assert preempt is not None  # only a run with a guard agrees to stop
    preempt.at_boundary()
    if state.step != saved_step:
        records.settle(ctx.cfg, state, window)
        # durable before the exit (75), whatever async_save says
        save(ctx, state, "checkpoint save (preemption)", sync=True)
    raise Preempted(preempt.signal_name or "a signal to another rank", state.step)


def save(ctx: LoopContext, state: TrainState, phase: str, **how: bool) -> None:
    """Checkpoint `state` (collective), with the wandb run it logs to; `phase`: what the hang watchdog names.
    `how`: save_checkpoint's options (sync=True: durable on return)."""
    state.wandb_run_id = ctx.log.wandb_run_id
    assert ctx.save_checkpoint is not None  # set for every run that saves (a bench run never does)
    ctx.progress.enter(phase)
    ctx.save_checkpoint(state, **how)
