"""The step's accounting: what each step leaves to read (loss, gradient norm, finite flag, loss scale), read on
the host only at log and checkpoint steps; skipped steps counted (TrainingError after too many in a row); the log
window summed and written as train/ and perf/ metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from bigtrain.metrics import mfu

if TYPE_CHECKING:
    from bigtrain.checkpoint import TrainState
    from bigtrain.config import Config
    from bigtrain.train.context import LoopContext


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite steps in a row); exit code 1."""


def new_window() -> dict[str, float]:
    """The sums over the steps since the last log line: loss (of the finite steps), steps, tokens, seconds."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "fwd_bwd_s": 0.0, "optim_s": 0.0}


class StepRecords:
    """Each step's loss, gradient norm, finite flag and loss scale, kept as the (device) tensors they are until
    `settle` reads them on the host, at log and checkpoint steps: a step that logs nothing reads none of them."""

    def __init__(self):
        self.pending: list[tuple] = []
        self.last_loss = self.last_grad_norm = float("nan")

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor, loss_scale) -> None:
        self.pending.append((step, loss, grad_norm, finite, loss_scale))

    def settle(self, cfg: Config, state: TrainState, window: dict) -> None:
        """Read the pending steps in order: count the skipped ones (a TrainingError after too many in a row, naming
        the step) and add the finite ones' losses to the log window."""
        pending, self.pending = self.pending, []
        for step, loss, grad_norm, finite, loss_scale in pending:
            loss, grad_norm, finite = float(loss), float(grad_norm), bool(finite)
            _count_skip(cfg, state, finite, loss, grad_norm, None if loss_scale is None else float(loss_scale), step=step)
            window["loss"] += loss if finite else 0.0
            window["steps"] += 1 if finite else 0
            self.last_loss, self.last_grad_norm = loss, grad_norm


def _count_skip(cfg: Config, state: TrainState, finite: bool, loss: float, grad_norm: float, loss_scale: float | None,
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


def log_train(ctx: LoopContext, state: TrainState, window: dict, times: dict, lr: float, grad_norm: float) -> None:
    """A log step's train/ and perf/ metrics over the window (metrics.jsonl, wandb, ctx.history); `times`: the
    StepTimer's window."""
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
    ctx.log.log(state.step, metrics)
    ctx.history.append({"step": state.step, **metrics})


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (each recompile for a new shape is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
