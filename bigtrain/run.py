"""The one place the build order is written: dist → data → task → model → optimizer → engine → resume → loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bigtrain import checkpoint
from bigtrain.config import Config, dump_yaml
from bigtrain.data import load_prepared, prepare_data
from bigtrain.errors import UserError
from bigtrain.loop import LoopContext, train
from bigtrain.metrics import MetricsLogger, peak_flops_per_sec
from bigtrain.models import build_model, resolve_model_spec
from bigtrain.optim import build_optimizer
from bigtrain.strategy import Dist, barrier, broadcast_object, build_engine, init_distributed, resolve_strategy, shutdown
from bigtrain.tasks import build_task

VOCAB_MULTIPLE = 64  # pad the embedding table so matmuls hit fast kernel sizes


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def check_model(cfg: Config):
    """Resolve the model spec and check it against the data settings (no weights are built)."""
    spec = resolve_model_spec(cfg.model)
    if cfg.data.seq_len > spec.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={spec.max_seq_len} "
                        f"(set model.max_seq_len or lower data.seq_len)")
    return spec


def on_main(dist: Dist, fn):
    """Run fn on rank 0 while the others wait; a UserError there is raised on every rank (no hang)."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    error = broadcast_object(dist, error)
    if error:
        raise UserError(error)
    return result


def log_main(dist: Dist, text: str) -> None:
    if dist.is_main:
        print(text, file=sys.stderr, flush=True)


def run_training(cfg: Config, *, bench: bool = False) -> LoopContext:
    """Train per the recipe; returns the loop context (state in ctx.state, logged records in ctx.history)."""
    check_model(cfg)
    dist = init_distributed(cfg.parallel.device)
    logger = None
    try:
        run_dir = cfg.run_dir()
        strategy = resolve_strategy(cfg.parallel.strategy, dist.world_size)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))

        # Data: rank 0 tokenizes and packs once (cached) and verifies the shards; the others then open them.
        def prepare_and_verify():
            prepare_data(cfg.data, log=lambda m: log_main(dist, m))
            load_prepared(cfg.data, verify=True)

        on_main(dist, prepare_and_verify)
        data = load_prepared(cfg.data, verify=False)
        task = build_task(cfg.task, pad_id=data.pad_id)

        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, padded_vocab_size(data.vocab_size), device=dist.device)
        optimizer = build_optimizer(cfg.optim, model, dist.device)
        engine = build_engine(cfg.parallel, model, optimizer, dist)
        state = checkpoint.resume(cfg.checkpoint.resume, run_dir, engine, dist, warn=lambda m: log_main(dist, m))

        table = engine.precision
        if dist.is_main:
            (run_dir / "precision.json").write_text(json.dumps(table.as_strings(), indent=1))
        log_main(dist, f"bigtrain: {run_dir} · {strategy} × {dist.world_size} on {dist.device.type} · "
                       f"{cfg.model.arch}/{cfg.model.preset} {model.num_params() / 1e6:.2f}M params · "
                       f"{len(data.train)} train samples of {cfg.data.seq_len} tokens · "
                       f"accumulation {cfg.train.accum_steps(dist.world_size)}"
                       + (f" · resuming at step {state.step}" if state.step else ""))
        log_main(dist, table.format())

        logger = MetricsLogger(cfg.logging, run_dir, enabled=dist.is_main, run_name=cfg.run.name,
                               config=cfg.to_dict(), total_steps=cfg.train.max_steps, start_step=state.step,
                               wandb_run_id=state.wandb_run_id)
        peak = peak_flops_per_sec(dist.device, table.compute) if dist.is_main else 1.0
        config_yaml = dump_yaml(cfg)
        ctx = LoopContext(
            cfg=cfg, dist=dist, engine=engine, task=task, train_data=data.train, val_data=data.validation,
            logger=logger, flops_per_token=model.flops_per_token(cfg.data.seq_len), peak_flops_per_sec=peak,
            save_checkpoint=lambda s: checkpoint.save(run_dir, s, engine, dist, config_yaml=config_yaml,
                                                      keep_last=cfg.checkpoint.keep_last),
            bench=bench,
        )
        ctx.state = train(ctx, state)
        barrier(dist)
        return ctx
    finally:
        if logger is not None:
            logger.close()
        shutdown(dist)
