"""A training job from start to exit, in the one order it runs: the recipe (init_from resolved once) → process
group → hang watchdog and preemption → the run dir's lease → build (build.py: data → task → model → optimizer →
engine) → resume → loop → final barrier → close. Also `bigtrain eval`'s job (run_eval)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import cast

from bigtrain import checkpoint
from bigtrain.checkpoint import open_weights
from bigtrain.checkpoint.lease import RunDirLease
from bigtrain.config import Config, dump_yaml, recipe_warnings
from bigtrain.config.schema import Precision
from bigtrain.core.errors import UserError
from bigtrain.core.hardware import Peak, matmul_peak, raised_peak
from bigtrain.metrics import MetricsLogger
from bigtrain.models import count_params
from bigtrain.parallel import Dist, barrier, init_distributed, launcher_precision, resolve_strategy, shutdown
from bigtrain.parallel.dist import on_main
from bigtrain.plan.model_check import check_model
from bigtrain.parallel.precision import Resolved, resolve_job_precision, slow_precision_warning
from bigtrain.train.build import Built, build, init_folders, log_main, with_init_from
from bigtrain.train.context import LoopContext
from bigtrain.train.evaluate import evaluate
from bigtrain.train.loop import train
from bigtrain.train.preempt import PREEMPTED_MARKER, Preempted, PreemptionGuard
from bigtrain.train.watchdog import Progress, Watchdog, enable_flight_recorder, position


def init_job(cfg: Config) -> Dist:
    """The process group for the recipe's parallel settings (see parallel/dist.py)."""
    p = cfg.parallel
    return init_distributed(p.device, timeout_s=p.init_timeout_s, collective_timeout_s=p.collective_timeout_s)


def resolve_for_job(cfg: Config, dist: Dist) -> tuple[Config, Resolved]:
    """The recipe with `parallel.precision` resolved for this job (rank 0 decides; see parallel/precision.py)."""
    resolved = resolve_job_precision(dist, cfg.parallel.precision, launcher_choice=launcher_precision(cfg.parallel))
    precision = cast(Precision, resolved.name)  # never `auto`: one of the names the recipe key takes
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision=precision)), resolved


def run_training(cfg: Config, *, bench: bool = False, preempt: PreemptionGuard | None = None) -> LoopContext:
    """Train per the recipe; returns the loop context (state in ctx.state, logged records in ctx.history).
    With `preempt`, a signal there stops training at the next step with a checkpoint: raises Preempted
    after rank 0 has written run_dir/preempted.json (what `bigtrain launch` requeues on).
    config.yaml keeps the recipe's precision (`auto` resolves again on the machine that resumes);
    precision.json records what it resolved to here, and why."""
    folders = init_folders(cfg)
    cfg = with_init_from(cfg, folders)
    check_model(cfg)
    enable_flight_recorder(cfg.run_dir())  # NCCL's record of the last collectives, for a hang (watchdog.py)
    dist = init_job(cfg)
    # From the process group to the exit: a hang anywhere (build, init_from, resume, the loop, the final barrier)
    # gets every rank's stacks and exit 3; a signal anywhere stops the job (preempt.py).
    progress = Progress()
    watchdog = Watchdog(cfg.parallel, dist, progress, cfg.run_dir()).start()
    if preempt is not None:
        preempt.held = lambda: watchdog.firing
        preempt.where = lambda: f"{position(progress.mark)} on rank {dist.rank}"
        preempt.before_exit = ((lambda name: write_preempted_marker(cfg.run_dir(), name, progress.mark[0]))
                               if dist.is_main else None)
    opened = Opened()
    try:
        ctx = train_job(cfg, folders, dist, progress, opened, bench=bench, preempt=preempt)
        progress.enter("final barrier")
        barrier(dist)
        return ctx
    except BaseException as e:
        watchdog.diagnose_error(e)  # a collective timeout, or a peer's hang report broke ours: exit 3
        raise
    finally:
        progress.enter("close: saves, logger, engine, process group")
        opened.close()
        shutdown(dist)
        watchdog.stop()


@dataclasses.dataclass
class Opened:
    """What a training job has opened so far: `close` closes it, in this order, however the job ends."""

    lease: RunDirLease | None = None
    built: Built | None = None
    logger: MetricsLogger | None = None
    saver: checkpoint.Checkpointer | None = None

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()  # on an error too: no save is left half-written by this process's exit
        if self.logger is not None:
            self.logger.close()
        if self.lease is not None:
            self.lease.release()  # only now: no save of this job is in flight
        if self.built is not None:
            self.built.engine.close()  # an engine's own threads and hooks go before the process group does


def train_job(cfg: Config, folders: dict[str, Path], dist: Dist, progress: Progress, opened: Opened, *, bench: bool,
              preempt: PreemptionGuard | None) -> LoopContext:
    """Lease, build, resume, train: run_training's job between the process group and its close (what it opens
    goes into `opened`)."""
    run_dir = cfg.run_dir()
    # One job per run dir (bigtrain/checkpoint/lease.py): taken before anything is written there, held by rank 0.
    opened.lease = on_main(dist, lambda: take_lease(run_dir, cfg.checkpoint.lease_timeout_s),
                           what="the run dir's lease")
    job_cfg, resolved = resolve_for_job(cfg, dist)
    progress.enter("build: data, model, engine")
    b = opened.built = build(job_cfg, dist, folders)  # creates the run dir
    config_yaml = dump_yaml(cfg)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # an earlier start's; this one may write its own
    verified = checkpoint.VerifiedCheckpoints()  # retention's record: the resumed checkpoint is read once
    progress.enter("resume")
    state = checkpoint.resume(cfg.checkpoint.resume, run_dir, b.engine, dist, warn=lambda m: log_main(dist, m),
                              base=b.base, verified=verified)
    if b.engine.ema:
        b.engine.ema.step = state.step
    peak = announce(cfg, b, state, resolved)
    logger = opened.logger = MetricsLogger(
        cfg.logging, run_dir, enabled=dist.is_main, run_name=cfg.run.name, config=cfg.to_dict(),
        total_steps=cfg.train.max_steps, start_step=state.step, wandb_run_id=state.wandb_run_id,
        curves=cfg.logging.curves and not bench)
    saver = opened.saver = checkpoint.Checkpointer(
        run_dir, b.engine, dist, config_yaml=config_yaml, keep_last=cfg.checkpoint.keep_last,
        extra_files=b.extra_files, async_save=cfg.checkpoint.async_save, verified=verified, lease=opened.lease)
    ctx = loop_context(job_cfg, b, logger, saver, peak, bench=bench, preempt=preempt, progress=progress)
    try:
        ctx.state = train(ctx, state)
        saver.wait()  # the last save is durable before the run ends
        if preempt is not None:
            preempt.unsaved = False  # a signal from here on stops at once: everything is saved
    except Preempted as e:
        saver.wait()  # a save of this very step may still be in flight
        if dist.is_main:
            write_preempted_marker(run_dir, e.signal_name, e.step)
        raise
    return ctx


def announce(cfg: Config, b: Built, state: checkpoint.TrainState, resolved: Resolved) -> Peak | None:
    """Rank 0 records the precision in RUN/precision.json and says what the job is (stderr); returns the device's
    MFU peak (rank 0; None elsewhere)."""
    dist, table, run_dir = b.dist, b.engine.precision, cfg.run_dir()
    peak = None
    if dist.is_main:
        (run_dir / "precision.json").write_text(json.dumps(
            {**table.as_strings(), "requested": resolved.requested, "reason": resolved.reason}, indent=1))
        peak = matmul_peak(dist.device, table.compute, table.param)
    log_main(dist, f"bigtrain: {run_dir} · {resolve_strategy(cfg.parallel.strategy, dist.world_size)} × "
                   f"{dist.world_size} on {dist.device.type} · {cfg.task.name} · "
                   f"{cfg.model.describe()} {count_params(b.model.spec) / 1e6:.2f}M params · "
                   f"{len(b.data.train)} train samples of ≤ {cfg.data.seq_len} tokens · "
                   f"accumulation {cfg.train.accum_steps(dist.world_size)}"
                   + (f" · resuming at step {state.step}" if state.step else ""))
    log_main(dist, f"precision {resolved.describe()}")
    log_main(dist, table.format())
    if peak is not None:  # rank 0's
        log_main(dist, f"MFU {peak.describe()}")
        for line in [*recipe_warnings(cfg), slow_precision_warning(resolved, dist.device)]:
            if line:
                log_main(dist, line)
    return peak


def loop_context(cfg: Config, b: Built, logger: MetricsLogger, saver: checkpoint.Checkpointer, peak: Peak | None, *,
                 bench: bool, preempt: PreemptionGuard | None, progress: Progress) -> LoopContext:
    """What the loop is given: the built job, its logger and saves, and (rank 0) the MFU peak, raised if the run
    beats it."""
    dist, table = b.dist, b.engine.precision

    def raise_peak(achieved_flops_per_sec: float) -> float:
        nonlocal peak
        assert peak is not None  # rank 0's, which alone raises it
        peak = raised_peak(peak, achieved_flops_per_sec, dist.device, table.compute, table.param)
        logger.message(f"bigtrain: this run went faster than the MFU peak; now {peak.describe()}")
        return peak.flops_per_sec

    return LoopContext(
        cfg=cfg, dist=dist, engine=b.engine, task=b.task, train_data=b.data.train, val_data=b.data.validation,
        logger=logger, flops_per_token=b.model.flops_per_token(cfg.data.seq_len),
        peak_flops_per_sec=peak.flops_per_sec if peak is not None else 1.0,  # rank 0's; the others log no MFU
        raise_peak=raise_peak if dist.is_main else None,
        save_checkpoint=saver.save,
        bench=bench, preempt=preempt, lm_eval=in_loop_tasks(cfg, dist, cfg.run_dir()) if not bench else None,
        memory=b.memory, progress=progress,
    )


def write_preempted_marker(run_dir: Path, signal_name: str, step: int) -> None:
    """RUN/preempted.json (rank 0): what `bigtrain launch` requeues on, naming the checkpoint to continue from."""
    saved = checkpoint.list_checkpoints(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PREEMPTED_MARKER).write_text(json.dumps(
        {"signal": signal_name, "step": step, "checkpoint": str(saved[-1]) if saved else None}, indent=1))


def take_lease(run_dir: Path, timeout_s: float) -> RunDirLease:
    """Rank 0: the run dir's lease, taken (or a one-line error naming its live holder) and renewed from now on."""
    lease = RunDirLease(run_dir, timeout_s)
    lease.acquire()
    lease.start_renewing()
    return lease


def in_loop_tasks(cfg: Config, dist: Dist, run_dir: Path):
    """eval.tasks' scorer (lm-eval, imported only when tasks are named), or None."""
    if not cfg.eval.tasks:
        return None
    from bigtrain.eval.lm_eval import InLoopTasks

    return InLoopTasks(cfg.eval, dist, run_dir, batch_size=cfg.eval.micro_batch_size or cfg.train.micro_batch_size)


def run_eval(cfg: Config, folder: Path) -> dict[str, float]:
    """The task's eval metrics of checkpoint `folder` on the validation split (every rank; same result)."""
    check_model(cfg)
    dist = init_job(cfg)
    try:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))
        cfg, _ = resolve_for_job(cfg, dist)
        if cfg.eval.use_ema:
            open_weights(folder, ema=True)  # a checkpoint without EMA weights: a one-line error, not its weights
        b = build(cfg, dist)
        if not len(b.data.validation):  # evaluate would report eval/loss 0, ppl 1
            held_out = "each data.mixture source's validation_split" if cfg.data.mixture else \
                f"data.validation_split={cfg.data.validation_split}"
            raise UserError(f"eval: the validation split of {cfg.run_dir()} is empty ({held_out} held out no "
                            f"document) — nothing to score; hold documents out when training (validation_split > 0)")
        checkpoint.load_base(folder, b.engine)  # a LoRA checkpoint's frozen base tensors, from its base
        b.engine.load_state(folder)
        ctx = LoopContext(cfg=cfg, dist=dist, engine=b.engine, task=b.task, train_data=b.data.train,
                          val_data=b.data.validation, logger=None, flops_per_token=0.0, peak_flops_per_sec=1.0,
                          save_checkpoint=None)
        metrics = evaluate(ctx)
        assert metrics is not None  # None only when a preemption stops a stoppable eval; this one is not
        return metrics
    finally:
        shutdown(dist)
