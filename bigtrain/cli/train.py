"""`bigtrain train`, `prepare` and `bench`: the commands that run a recipe's data or model (train and bench build
the whole job through `train.run`; prepare fills the data cache, without torch where it can)."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

from bigtrain.cli.recipe import recipe_config
from bigtrain.core.errors import UserError


def cmd_train(args) -> int:
    from bigtrain.train.preempt import EXIT_PREEMPTED, Preempted, PreemptionGuard

    # The guard goes up first, so a signal during start-up (imports, data, rendezvous) is not lost either.
    with PreemptionGuard() as guard:
        from bigtrain.train.run import run_training

        try:
            ctx = run_training(recipe_config(args), preempt=guard)
        except Preempted as e:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"bigtrain: {e}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
    assert ctx.state is not None  # run_training returns once train() has set it
    if ctx.dist.is_main:
        print(f"bigtrain: finished step {ctx.state.step} · run dir {ctx.cfg.run_dir()}", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    """Tokenize and pack the data unless the cache has it; its checksums are verified once (`--verify`: again),
    so running it at every job start (slurm/launch.sh does) costs a look at sizes and the index. Without
    model.init_from or task.teacher it imports no torch (a second or two of every job start)."""
    from bigtrain.data import load_prepared
    from bigtrain.data.prepare import prepare_sources, source_configs, verify_sources_once

    cfg = recipe_config(args)
    if (cfg.model.init_from or cfg.task.teacher) and not cfg.data.tokenizer:  # its tokenizer; only this needs torch
        from bigtrain.train.build import with_init_tokenizer

        cfg = with_init_tokenizer(cfg)
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    if workers < 1:
        raise UserError(f"prepare --workers={workers}: give at least 1")
    prepare_sources(cfg.data, task=cfg.task.data_task, workers=workers)
    if args.verify:
        prepared = [load_prepared(source, task=cfg.task.data_task, verify=True)
                    for source in source_configs(cfg.data, task=cfg.task.data_task)]
    else:
        prepared = verify_sources_once(cfg.data, task=cfg.task.data_task)
    for data in prepared:  # a mixture: one line per source
        print(f"prepared {data.path}: vocab {data.vocab_size} · train {data.train.num_tokens:,} tokens "
              f"({len(data.train):,} samples) · validation {data.validation.num_tokens:,} tokens "
              f"({len(data.validation):,} samples)")
    return 0


def cmd_bench(args) -> int:
    from bigtrain.train.run import run_training

    cfg = recipe_config(args)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bigtrain-bench-") as tmp:
        cfg = dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, output_dir=tmp),
            train=dataclasses.replace(cfg.train, max_steps=max(steps, cfg.train.max_steps), stop_at_step=steps),
            checkpoint=dataclasses.replace(cfg.checkpoint, resume="none"),
            logging=dataclasses.replace(cfg.logging, every=1, wandb="disabled", progress=False),
        )
        ctx = run_training(cfg, bench=True)
    if not ctx.dist.is_main:
        return 0
    measured = [r for r in ctx.history if r["step"] > args.warmup]
    mean = lambda key: sum(r[key] for r in measured) / len(measured)  # noqa: E731
    step_s = mean("perf/step_time_s")
    print(f"bench {args.recipe}: {len(measured)} steps after {args.warmup} warmup · "
          f"{ctx.dist.world_size} × {ctx.dist.device.type} · precision {ctx.engine.precision.name}")
    print(f"tokens/s     {mean('perf/tokens_per_sec'):,.0f}")
    print(f"MFU          {mean('perf/mfu'):.3f} (FLOPs/token {ctx.flops_per_token:.4g}, "
          f"peak {ctx.peak_flops_per_sec / 1e9:,.0f} GFLOP/s per device)")
    print(f"step time    {step_s * 1e3:.1f} ms = forward+backward {mean('perf/fwd_bwd_s') * 1e3:.1f} ms"
          f" + optimizer {mean('perf/optim_s') * 1e3:.1f} ms + data {mean('perf/data_wait_frac') * step_s * 1e3:.2f} ms"
          f" ({mean('perf/data_wait_frac') * 100:.2f}% waiting for data)")
    print(f"memory       {max(r['perf/max_memory_gb'] for r in measured):.3f} GB peak (since the model was built)")
    if "perf/compiled_graphs" in measured[-1]:  # parallel.compile: graphs made while measuring are recompiles
        before = next((r["perf/compiled_graphs"] for r in ctx.history if r["step"] == args.warmup), 0)
        print(f"compile      {measured[-1]['perf/compiled_graphs']} graphs, "
              f"{measured[-1]['perf/compiled_graphs'] - before} of them recompiled in the measured steps")
    return 0

