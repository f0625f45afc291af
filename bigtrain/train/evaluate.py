"""Eval during training (and `bigtrain eval`): the task's metrics on the validation split, each rank a disjoint
chunk, all-reduced; eval.tasks' lm-eval scores of the same model; a preemption signal abandons it on every rank
at the same batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bigtrain.data import eval_busiest_count, eval_indices
from bigtrain.eval.report import report_eval
from bigtrain.parallel import all_reduce_host, all_reduce_sum
from bigtrain.parallel.ema import ema_weights
from bigtrain.tasks import EVAL_KEY_OFFSET

if TYPE_CHECKING:
    from bigtrain.train.context import LoopContext


class _EvalAbandoned(Exception):
    """Every rank got to the same eval.tasks forward with a preemption signal somewhere: stop scoring."""


def preemption_agreed(ctx: LoopContext) -> bool:
    """Whether any rank got a preemption signal (one host all-reduce; every rank calls it at the same point)."""
    requested = ctx.preempt is not None and ctx.preempt.requested
    return bool(all_reduce_host(ctx.dist, [float(requested)])[0])


def evaluate_and_report(ctx: LoopContext, step: int) -> bool:
    """The loop's eval after `step`: scalars to metrics.jsonl, a classification report to eval/step-N.json and
    RUN/curves.png redrawn (rank 0). False when a preemption signal ended it early on every rank (nothing logged)."""
    metrics = evaluate(ctx, stoppable=ctx.preempt is not None)
    if metrics is None:
        return False
    report_eval(ctx.log, step, metrics, run_dir=ctx.cfg.run_dir() if ctx.dist.is_main else None)
    ctx.log.write_curves()  # RUN/curves.png redrawn from metrics.jsonl (rank 0; never stops training)
    return True


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
    model = ctx.engine.module
    was_training = model.training
    model.eval()
    sums = _local_sums(ctx, model, eval_positions(ctx.val_data, ctx.cfg.eval.max_samples), stoppable)
    metrics = None if sums is None else _reduced_metrics(ctx, sums)
    if metrics is not None and ctx.lm_eval is not None:  # eval.tasks: lm-eval's scores of the model, every rank a share
        scores = _lm_eval_scores(ctx, model, stoppable)
        metrics = None if scores is None else {**metrics, **scores}
    model.train(was_training)
    return metrics


def _local_sums(ctx: LoopContext, model: nn.Module, groups: dict[str | None, np.ndarray],
                stoppable: bool) -> dict[str | None, dict[str, float]] | None:
    """This rank's eval sums of each group (source) of validation positions; None when the ranks agreed to stop."""
    cfg, dist, task = ctx.cfg, ctx.dist, ctx.task
    # Ranks' chunks of a group differ by at most one sample, so a rank may have one batch fewer. A sharded model's
    # forward is collective (FSDP/ZeRO-3 all-gather parameters), so every rank runs as many forwards as the
    # busiest one; a rank out of samples runs a spare one-sample batch and discards it.
    plan = [(name, positions[eval_indices(len(positions), dist.rank, dist.world_size)],
             eval_busiest_count(len(positions), dist.world_size)) for name, positions in groups.items()]
    batch_size = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
    batches = sum(-(-busiest // batch_size) for _, _, busiest in plan)
    sums = {name: dict.fromkeys(task.eval_keys, 0.0) for name in groups}
    done = 0
    for name, mine, busiest in plan:
        for start in range(0, busiest, batch_size):
            done += 1
            ctx.progress.enter(f"eval batch {done}/{batches}")  # the same on every rank
            if stoppable and preemption_agreed(ctx):
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
    return sums


def _reduced_metrics(ctx: LoopContext, sums: dict[str | None, dict[str, float]]) -> dict[str, float]:
    """The task's eval metrics of every rank's sums, overall and (a mixture) per source."""
    task = ctx.task
    # Sums and counts of every source all-reduced at once: each loss is a global sum over the global target count.
    local = [sums[name][key] for name in sums for key in task.eval_keys]
    totals = all_reduce_sum(ctx.dist, torch.tensor(local, dtype=torch.float64, device=ctx.dist.device)).tolist()
    width = len(task.eval_keys)
    reduced = {name: dict(zip(task.eval_keys, totals[i * width:(i + 1) * width])) for i, name in enumerate(sums)}
    metrics = task.eval_metrics({key: sum(part[key] for part in reduced.values()) for key in task.eval_keys})
    metrics.update({f"eval/loss/{name}": task.eval_metrics(part)["eval/loss"]
                    for name, part in reduced.items() if name is not None})
    return metrics


def _lm_eval_scores(ctx: LoopContext, model: nn.Module, stoppable: bool) -> dict[str, float] | None:
    """eval.tasks' scores of `model` (every rank a share); None when the ranks agreed to stop."""

    def forward_context():  # each forward is a phase: a long task is progress, not a hang
        ctx.progress.enter("eval.tasks forward")
        # every rank runs as many forwards (padded to the busiest: a sharded forward is collective), so the
        # ranks agree here, at the same forward, to abandon the tasks on a preemption signal
        if stoppable and preemption_agreed(ctx):
            raise _EvalAbandoned
        return ctx.engine.autocast()

    scorer = ctx.lm_eval
    assert scorer is not None  # _evaluate asks only with eval.tasks set
    try:
        return scorer(model, forward_context)
    except _EvalAbandoned:
        return None
