"""`bigtrain check`: validate one recipe or several and print what a run of it would be (model, batch, strategy,
teacher, the memory plan per rank, the precision it resolves to on this machine) before a run spends anything."""

from __future__ import annotations

import argparse
import dataclasses
import os

from bigtrain.cli.recipe import recipe_config
from bigtrain.core.errors import UserError, say


def cmd_check(args) -> int:
    """Each recipe named (arguments after the first that end in .yaml/.yml and hold no '=' are recipes too): exit 2
    if any is invalid (each bad one a line naming it, the rest still checked), 1 if any plan does not fit, else 0."""
    is_recipe = lambda a: "=" not in a and a.endswith((".yaml", ".yml"))  # noqa: E731
    more = [a for a in args.overrides if is_recipe(a)]
    if not more:
        return _check_one(args)
    overrides = [a for a in args.overrides if not is_recipe(a)]
    worst = 0
    for recipe in [args.recipe, *more]:
        try:
            code = _check_one(argparse.Namespace(**{**vars(args), "recipe": recipe, "overrides": overrides}))
        except UserError as e:
            say(f"bigtrain: error: {e}" if recipe in str(e) else f"bigtrain: error: {recipe}: {e}")
            code = 2
        worst = max(worst, code)  # 2 (invalid) over 1 (does not fit) over 0
        print()
    return worst


def _check_one(args) -> int:
    from bigtrain.config import describe, recipe_warnings
    from bigtrain.plan.memory import plan_memory
    from bigtrain.plan.model_check import check_model
    from bigtrain.train.build import padded_vocab_size
    from bigtrain.parallel import precision_table, resolve_strategy
    from bigtrain.parallel.precision import slow_precision_warning

    cfg = recipe_config(args)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or args.nodes < 1 or world_size % args.nodes:
        raise UserError(f"check --world-size={world_size} --nodes={args.nodes}: the ranks must split evenly over "
                        f"at least one node")
    spec = check_model(cfg)  # an HF init_from brings its own vocab_size; None: a hub id not downloaded yet
    if spec is not None and spec.vocab_size is None:
        spec = dataclasses.replace(spec, vocab_size=padded_vocab_size(_vocab_size(cfg)))
    device, resolved = _device_and_precision(cfg)
    strategy = resolve_strategy(cfg.parallel.strategy, world_size)
    table = precision_table(resolved.name, strategy)
    t = cfg.train
    print(f"recipe {args.recipe}: valid")
    print(f"run dir      {cfg.run_dir()}")
    _print_model(cfg, spec)
    print(f"batch        global {t.global_batch_size} = micro {t.micro_batch_size} × accumulation "
          f"{t.accum_steps(world_size)} × data-parallel {world_size} · "
          f"{t.global_batch_size * cfg.data.seq_len:,} tokens/step · {t.max_steps:,} steps")
    print(f"strategy     {strategy}{f' (ZeRO-{cfg.parallel.zero_stage})' if strategy == 'deepspeed' else ''}"
          f"{'' if cfg.parallel.activation_checkpointing == 'none' else f' · activation checkpointing ({cfg.parallel.activation_checkpointing})'}"
          f"{' · compile' if cfg.parallel.compile else ''}")
    teacher = _print_teacher(cfg, spec, table) if cfg.task.teacher else None
    fits = True
    if spec is not None:
        plan = plan_memory(cfg, spec, world_size=world_size, table=table, strategy=strategy, device_type=device.type,
                           teacher=teacher)
        print(f"memory       per rank, {world_size} rank{'s' if world_size > 1 else ''} on {args.nodes} "
              f"node{'s' if args.nodes > 1 else ''} ({world_size // args.nodes} per node):")
        for line in plan.lines(args.device_memory_gb):
            print(f"             {line}")
        fits = args.device_memory_gb is None or plan.fits(args.device_memory_gb)
    print(f"precision    {resolved.describe()}")
    print("             " + "  ".join(f"{k}={v}" for k, v in table.as_strings().items() if k != "name"))
    for warning in [*recipe_warnings(cfg), slow_precision_warning(resolved, device)]:
        if warning:
            print(warning)
    if args.keys:
        print(describe())
    return 0 if fits else 1


def _device_and_precision(cfg):
    """The device a run of the recipe would use on this machine and the precision it resolves to there; a GPU
    recipe checked without a GPU assumes one with bf16, as most are."""
    import torch

    from bigtrain.parallel import launcher_precision
    from bigtrain.parallel.precision import Resolved, resolve_precision

    device = torch.device("cuda" if cfg.parallel.device == "cuda" or (cfg.parallel.device == "auto"
                                                                     and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():  # checking a GPU recipe on a laptop
        requested = cfg.parallel.precision
        resolved = Resolved(requested, "bf16" if requested == "auto" else requested,
                            "no GPU on this machine: a GPU with bf16 assumed (it resolves on the GPU at start)")
    else:
        resolved = resolve_precision(cfg.parallel.precision, device, launcher_choice=launcher_precision(cfg.parallel))
    return device, resolved


def _print_model(cfg, spec) -> None:
    """The model's shape, parameters and FLOPs/token; for a hub id not downloaded yet (spec None), only its name."""
    from bigtrain.models import count_params, spec_flops_per_token

    if spec is None:
        revision = f" (revision {cfg.model.init_revision})" if cfg.model.init_revision else ""
        print(f"model        {cfg.model.init_from}{revision}: a Hugging Face hub id not in the local cache — its "
              f"config.json sets the model, checked when a run downloads it")
        return
    params = count_params(spec)
    print(f"model        {cfg.model.describe()}: {spec.n_layers} layers × d_model {spec.d_model}, "
          f"{spec.n_heads} heads ({spec.n_kv_heads} kv), d_ff {spec.d_ff}, {spec.norm}/{spec.position}/{spec.mlp}, "
          f"vocab {spec.vocab_size}{', tied' if spec.tie_embeddings else ''}")
    head = " with a 2-label classifier (the label count comes from the data)" if cfg.task.data_task == "classification" else ""
    print(f"parameters   {params:,} ({params / 1e6:.1f}M){head}")
    print(f"FLOPs/token  {spec_flops_per_token(spec, cfg.data.seq_len):.4g} (training, seq_len {cfg.data.seq_len})")


def _print_teacher(cfg, spec, table):
    """task.teacher's shape and parameters; returns its spec for the memory plan (None: not there yet)."""
    from bigtrain.models import count_params
    from bigtrain.tasks.teacher import planned_teacher
    from bigtrain.train.build import padded_vocab_size

    teacher = planned_teacher(cfg, spec.vocab_size if spec is not None else padded_vocab_size(_vocab_size(cfg)))
    if teacher is None:
        print(f"teacher      {cfg.task.teacher}: not there yet — its shape and tokenizer are checked when the run "
              f"starts")
    else:
        print(f"teacher      {cfg.task.teacher}: {teacher.n_layers} layers × d_model {teacher.d_model}, "
              f"{count_params(teacher):,} parameters ({count_params(teacher) / 1e9:.2f}B), frozen in "
              f"{str(table.compute).removeprefix('torch.')}")
    return teacher


def _vocab_size(cfg) -> int:
    """Vocabulary size without preparing data: the tokenizer file's, else the BPE size to train."""
    if cfg.data.tokenizer:
        from tokenizers import Tokenizer

        from bigtrain.data.tokenizer import tokenizer_file

        return Tokenizer.from_file(str(tokenizer_file(cfg.data.tokenizer))).get_vocab_size()
    return cfg.data.vocab_size
