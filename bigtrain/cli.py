"""`bigtrain` subcommands: train, check, prepare, bench, eval, export, generate, verify, plot, launch. Bad input exits 2 with one line; no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError, say



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Train transformer LMs from one recipe, one core to many nodes.")
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
        return p

    command("train", "train per the recipe: one process, or every rank of a job started by torchrun, deepspeed, "
                     "accelerate launch or `bigtrain launch` (parallel.strategy: single, ddp, fsdp, deepspeed)")
    check = command("check", "validate a recipe (or several: `bigtrain check recipes/*.yaml`, the overrides apply to "
                             "each); print parameters, FLOPs/token, the memory plan per rank, and the precision it "
                             "resolves to on this machine")
    check.add_argument("--keys", action="store_true", help="also list every recipe key with its help")
    check.add_argument("--world-size", type=int, help="ranks the job will run on (default: WORLD_SIZE, else 1)")
    check.add_argument("--nodes", type=int, default=1, help="nodes those ranks are spread over (default 1)")
    check.add_argument("--device-memory-gb", type=float, metavar="GB",
                       help="say whether the plan's peak fits a device of this many GB (exit 1 if not)")
    prep = command("prepare", "tokenize and pack the recipe's data once into the cache")
    prep.add_argument("--workers", type=int, default=None,
                      help="processes tokenizing at once (default: every CPU this process may use)")
    prep.add_argument("--verify", action="store_true",
                      help="check every byte of the prepared cache again (otherwise once, the first time it is opened)")
    bench = command("bench", "measure tokens/s, MFU and the step-time breakdown")
    bench.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")
    ev = sub.add_parser("eval", help="eval metrics of a run's checkpoint on the validation split",
                        description="eval metrics of a run's checkpoint (default: the newest) on the validation split")
    ev.add_argument("run_dir", help="run dir (runs/NAME)")
    ev.add_argument("overrides", nargs="*", metavar="section.key=value", help="override the run's recipe values")
    ev.add_argument("--checkpoint", help="checkpoint folder name (step-N or step-NNNNNNN) or path")
    ev.add_argument("--tasks", help="instead: lm-eval tasks, comma-separated (hellaswag,arc_easy; a decoder only; "
                                    "needs bigtrain[eval]); scores to RUN/eval/lm-eval-step-N.json and wandb")
    ev.add_argument("--include-path", metavar="DIR", help="--tasks: a folder of custom lm-eval task YAML files")
    ev.add_argument("--limit", type=int, help="--tasks: the first N documents of each task only")
    ev.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples per prompt (default: the task's)")
    ev.add_argument("--batch-size", type=int, default=16, help="--tasks: sequences per forward (default 16)")
    ex = sub.add_parser("export", help="consolidated weights (model.safetensors + config.yaml) of any strategy's checkpoint",
                        description="write the consolidated weights of a checkpoint (a run dir means its newest) as "
                                    "OUT/model.safetensors plus config.yaml and the tokenizer, or (--format hf) as a "
                                    "Hugging Face folder that transformers' from_pretrained loads")
    ex.add_argument("source", help="run dir or checkpoint folder")
    ex.add_argument("out", help="output folder")
    ex.add_argument("--format", choices=("bigtrain", "hf"), default="bigtrain",
                    help="bigtrain (default): bigtrain's own folder; hf: a Hugging Face model folder "
                         "(GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM)")
    ex.add_argument("--ema", action="store_true",
                    help="export the EMA weights the run kept (optim.ema_decay) instead of the trained ones")
    ex.add_argument("--adapter", action="store_true",
                    help="--format hf of a LoRA run: a PEFT adapter folder (adapter_config.json + "
                         "adapter_model.safetensors) instead of the merged model")
    ex.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="--format hf: dtype of the written tensors (default fp32)")
    ex.add_argument("--max-shard-size", default="5GB",
                    help="--format hf: largest model-*.safetensors shard, e.g. 500MB, 5GB (default 5GB)")
    gen = sub.add_parser("generate", help="generate text from a run dir, checkpoint or Hugging Face folder",
                         description="generate text from a run dir (its newest checkpoint), a checkpoint folder or a "
                                     "Hugging Face model folder: greedy (temperature 0, the default) or sampled, with a "
                                     "KV cache; a --prompt streams to stdout, --prompts prints one JSON line per prompt; "
                                     "tokens/s goes to stderr")
    gen.add_argument("source", help="run dir, checkpoint folder or Hugging Face model folder")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text; its completion is streamed to stdout")
    prompt.add_argument("--prompts", metavar="FILE",
                        help="prompts generated as batches: one per line, or for *.jsonl a JSON string or "
                             '{"prompt": ...} per line; prints {"prompt", "completion"} JSON lines')
    gen.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    gen.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only")
    gen.add_argument("--top-p", type=float, help="sample from the smallest set of tokens whose probability reaches p")
    gen.add_argument("--seed", type=int, help="seed of the sampling generator (same seed, same text)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT",
                     help="stop when the completion contains TEXT (cut from it); repeatable. EOS always stops")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each token (no KV cache)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the tokenizer's chat template")
    gen.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights dtype (default fp32)")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    gen.add_argument("--batch-size", type=int, default=16, help="--prompts generated together (default 16)")
    ver = sub.add_parser("verify", help="check every byte of a run's checkpoints (or one checkpoint) against its manifest",
                         description="check each file's size and sha256 against the manifest, for every checkpoint "
                                     "of a run dir or one checkpoint folder (resume checks the one it takes, the "
                                     "ranks sharing the files); exit 2 if any is damaged")
    ver.add_argument("source", help="run dir or checkpoint folder")
    plot = sub.add_parser("plot", help="draw the curves of one or more runs from their metrics.jsonl to a PNG",
                          description="draw loss, LR, tokens/s, grad norm and the task's eval metrics (or the "
                                      "--metric keys) of one or more runs, one colour per run; needs matplotlib "
                                      "(pip install 'bigtrain[plot]')")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run dir (runs/NAME) with a metrics.jsonl")
    plot.add_argument("--metric", nargs="+", action="extend", metavar="KEY", help="metrics.jsonl keys to draw, e.g. train/loss "
                      "eval/accuracy (default: train and eval loss, LR, tokens/s, grad norm, the task's eval metrics)")
    plot.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default: RUN/curves.png for one run, "
                                                             "./curves.png for several)")
    plot.add_argument("--log-steps", action="store_true", help="log-scale step axis")
    sub.add_parser("launch", help="start training on this node under torchrun, deepspeed or accelerate (see `bigtrain launch -h`)",
                   add_help=False, prefix_chars="\0")  # its own flags: parsed by launcher.cli
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # the launcher has its own flags and imports no torch
        from launcher.cli import main as launch_main

        return launch_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "check": cmd_check, "prepare": cmd_prepare, "bench": cmd_bench,
                    "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "verify": cmd_verify,
                    "plot": cmd_plot}
        return commands[args.command](args)
    except UserError as e:
        say(f"bigtrain: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # TrainingError and friends: one clear line, keep the traceback for bugs
        from bigtrain.train.accounting import TrainingError

        if isinstance(e, TrainingError):
            say(f"bigtrain: training stopped: {e}")
            return 1
        raise


def _config(args, **kwargs):
    from bigtrain.config import load_config

    return load_config(args.recipe, _with_launcher_choices(args.recipe, args.overrides), **kwargs)


def _with_launcher_choices(recipe, overrides: list[str]) -> list[str]:
    """Under `accelerate launch`, its flags (--mixed_precision, --use_deepspeed, …) as parallel.* overrides;
    a flag that contradicts a value the recipe sets is a UserError naming both."""
    from launcher.accelerate_env import accelerate_overrides, launched_by_accelerate

    if not launched_by_accelerate(os.environ):
        return list(overrides)
    from bigtrain.config import load_raw

    return [*overrides, *accelerate_overrides(os.environ, load_raw(recipe, overrides), where=str(recipe))]


def cmd_train(args) -> int:
    from bigtrain.train.preempt import EXIT_PREEMPTED, Preempted, PreemptionGuard

    # The guard goes up first, so a signal during start-up (imports, data, rendezvous) is not lost either.
    with PreemptionGuard() as guard:
        from bigtrain.train.run import run_training

        try:
            ctx = run_training(_config(args), preempt=guard)
        except Preempted as e:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"bigtrain: {e}", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
    if ctx.dist.is_main:
        print(f"bigtrain: finished step {ctx.state.step} · run dir {ctx.cfg.run_dir()}", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    """Tokenize and pack the data unless the cache has it; its checksums are verified once (`--verify`: again),
    so running it at every job start (slurm/launch.sh does) costs a look at sizes and the index. Without
    model.init_from or task.teacher it imports no torch (a second or two of every job start)."""
    from bigtrain.data import load_prepared
    from bigtrain.data.prepare import prepare_sources, source_configs, verify_sources_once

    cfg = _config(args)
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
    import torch

    from bigtrain.config import describe, recipe_warnings
    from bigtrain.plan.memory import plan_memory
    from bigtrain.models import check_model, count_params, spec_flops_per_token
    from bigtrain.train.build import padded_vocab_size
    from bigtrain.parallel import launcher_precision, precision_table, resolve_strategy
    from bigtrain.parallel.precision import Resolved, resolve_precision, slow_precision_warning

    cfg = _config(args)
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1 or args.nodes < 1 or world_size % args.nodes:
        raise UserError(f"check --world-size={world_size} --nodes={args.nodes}: the ranks must split evenly over "
                        f"at least one node")
    spec = check_model(cfg)  # an HF init_from brings its own vocab_size; None: a hub id not downloaded yet
    if spec is not None and spec.vocab_size is None:
        spec = dataclasses.replace(spec, vocab_size=padded_vocab_size(_vocab_size(cfg)))
    device = torch.device("cuda" if cfg.parallel.device == "cuda" or (cfg.parallel.device == "auto"
                                                                     and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():  # checking a GPU recipe on a laptop
        requested = cfg.parallel.precision
        resolved = Resolved(requested, "bf16" if requested == "auto" else requested,
                            "no GPU on this machine: a GPU with bf16 assumed (it resolves on the GPU at start)")
    else:
        resolved = resolve_precision(cfg.parallel.precision, device, launcher_choice=launcher_precision(cfg.parallel))
    strategy = resolve_strategy(cfg.parallel.strategy, world_size)
    table = precision_table(resolved.name, strategy)
    t = cfg.train
    print(f"recipe {args.recipe}: valid")
    print(f"run dir      {cfg.run_dir()}")
    if spec is None:
        revision = f" (revision {cfg.model.init_revision})" if cfg.model.init_revision else ""
        print(f"model        {cfg.model.init_from}{revision}: a Hugging Face hub id not in the local cache — its "
              f"config.json sets the model, checked when a run downloads it")
    else:
        params = count_params(spec)
        print(f"model        {cfg.model.describe()}: {spec.n_layers} layers × d_model {spec.d_model}, "
              f"{spec.n_heads} heads ({spec.n_kv_heads} kv), d_ff {spec.d_ff}, {spec.norm}/{spec.position}/{spec.mlp}, "
              f"vocab {spec.vocab_size}{', tied' if spec.tie_embeddings else ''}")
        head = " with a 2-label classifier (the label count comes from the data)" if cfg.task.data_task == "classification" else ""
        print(f"parameters   {params:,} ({params / 1e6:.1f}M){head}")
        print(f"FLOPs/token  {spec_flops_per_token(spec, cfg.data.seq_len):.4g} (training, seq_len {cfg.data.seq_len})")
    print(f"batch        global {t.global_batch_size} = micro {t.micro_batch_size} × accumulation "
          f"{t.accum_steps(world_size)} × data-parallel {world_size} · "
          f"{t.global_batch_size * cfg.data.seq_len:,} tokens/step · {t.max_steps:,} steps")
    print(f"strategy     {strategy}{f' (ZeRO-{cfg.parallel.zero_stage})' if strategy == 'deepspeed' else ''}"
          f"{'' if cfg.parallel.activation_checkpointing == 'none' else f' · activation checkpointing ({cfg.parallel.activation_checkpointing})'}"
          f"{' · compile' if cfg.parallel.compile else ''}")
    teacher = None
    if cfg.task.teacher:
        from bigtrain.tasks.teacher import planned_teacher

        teacher = planned_teacher(cfg, spec.vocab_size if spec is not None else padded_vocab_size(_vocab_size(cfg)))
        if teacher is None:
            print(f"teacher      {cfg.task.teacher}: not there yet — its shape and tokenizer are checked when the run "
                  f"starts")
        else:
            print(f"teacher      {cfg.task.teacher}: {teacher.n_layers} layers × d_model {teacher.d_model}, "
                  f"{count_params(teacher):,} parameters ({count_params(teacher) / 1e9:.2f}B), frozen in "
                  f"{str(table.compute).removeprefix('torch.')}")
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
    for line in [*recipe_warnings(cfg), slow_precision_warning(resolved, device)]:
        if line:
            print(line)
    if args.keys:
        print(describe())
    return 0 if fits else 1


def _vocab_size(cfg) -> int:
    """Vocabulary size without preparing data: the tokenizer file's, else the BPE size to train."""
    if cfg.data.tokenizer:
        from tokenizers import Tokenizer

        from bigtrain.data.tokenizer import tokenizer_file

        return Tokenizer.from_file(str(tokenizer_file(cfg.data.tokenizer))).get_vocab_size()
    return cfg.data.vocab_size


def cmd_bench(args) -> int:
    from bigtrain.train.run import run_training

    cfg = _config(args)
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


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from bigtrain.checkpoint import store as checkpoint
    from bigtrain.config import load_config
    from bigtrain.eval.report import console_text, eval_file, scalars, write_eval_file
    from bigtrain.train.build import TOKENIZER_FILE
    from bigtrain.train.run import run_eval

    if args.tasks is not None:
        return cmd_lm_eval(args)
    flag = next((f for f, v in (("--include-path", args.include_path), ("--limit", args.limit),
                                ("--num-fewshot", args.num_fewshot)) if v is not None), None)
    if flag:
        raise UserError(f"eval {flag}: applies to lm-eval tasks only — add --tasks NAME[,NAME…]")
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"eval: '{run_dir}' is not a run dir (no config.yaml)")
    folder = _eval_checkpoint(run_dir, args.checkpoint)
    tokenizer = folder / TOKENIZER_FILE if (folder / TOKENIZER_FILE).is_file() else run_dir / TOKENIZER_FILE
    overrides = [f"data.tokenizer={tokenizer}", "checkpoint.resume=none", *args.overrides]
    cfg = load_config(run_dir / "config.yaml", _with_launcher_choices(run_dir / "config.yaml", overrides))
    metrics = run_eval(cfg, folder)
    if int(os.environ.get("RANK", "0")) == 0:
        step = safe_load.read_json(folder / checkpoint.TRAINER)["step"]
        out = write_eval_file(eval_file(run_dir, folder.name), step, metrics, checkpoint=folder)
        print(console_text(step, metrics), file=sys.stderr)  # the summary line (and a classification table)
        print(json.dumps({"step": step, **scalars(metrics)}))  # one machine-readable line; the report is in the file
        print(f"bigtrain: eval of {folder} → {out}", file=sys.stderr)
    return 0


def cmd_lm_eval(args) -> int:
    """`bigtrain eval RUN --tasks …`: lm-eval tasks on the checkpoint; RUN/eval/lm-eval-step-N.json, wandb, a table."""
    import json
    from pathlib import Path

    from bigtrain.checkpoint import store as checkpoint
    from bigtrain.eval.report import EVAL_DIR, write_eval_file

    source = Path(args.run_dir)
    if args.overrides:
        raise UserError(f"eval --tasks: recipe overrides ({args.overrides[0]}) do not apply to lm-eval tasks")
    if (source / checkpoint.MANIFEST).is_file() and args.checkpoint is None:  # a checkpoint folder itself
        checkpoint.verify(source)
        folder, run_dir = source, source.parent.parent
    elif (source / "config.yaml").is_file():
        folder, run_dir = _eval_checkpoint(source, args.checkpoint), source
    else:
        raise UserError(f"eval: '{source}' is not a run dir (no config.yaml) or a checkpoint folder")
    from bigtrain.eval.lm_eval import (REPORT_PREFIX, check_tasks, require_lm_eval, run_config, run_lm_eval,
                                          scores_table, task_manager, task_scores)

    require_lm_eval()
    from bigtrain.eval.generate import load_generator

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    manager = task_manager(args.include_path)
    check_tasks(tasks, manager)  # before the model loads: a typo fails fast
    trainer = safe_load.read_json(folder / checkpoint.TRAINER)
    results = run_lm_eval(load_generator(folder), tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                          batch_size=args.batch_size)
    scores = task_scores(results)
    config = run_config(results, tasks=tasks, include_path=args.include_path, limit=args.limit,
                        num_fewshot=args.num_fewshot)
    step = trainer["step"]
    out = write_eval_file(run_dir / EVAL_DIR / f"{REPORT_PREFIX}{folder.name}.json", step,
                          {"tasks": scores, "lm_eval": config}, checkpoint=folder)
    _log_lm_eval_to_wandb(run_dir, folder, step, trainer.get("wandb_run_id"), scores)
    print(scores_table(scores), file=sys.stderr)
    print(json.dumps({"step": step, "tasks": scores}))  # one machine-readable line; the config is in the file
    print(f"bigtrain: lm-eval of {folder} → {out}", file=sys.stderr)
    return 0


def _log_lm_eval_to_wandb(run_dir, folder, step: int, run_id: str | None, scores: dict) -> None:
    """lm_eval/<task>/<metric> at `step` to the run's wandb run (when its recipe logs to wandb)."""
    from bigtrain.config import build_config
    from bigtrain.metrics import MetricsLogger

    cfg = build_config(safe_load.read_yaml(folder / "config.yaml"), where=str(folder / "config.yaml"))
    if cfg.logging.wandb == "disabled":
        return
    values = {f"lm_eval/{task}/{metric}": v for task, metrics in scores.items() for metric, v in metrics.items()}
    logging = dataclasses.replace(cfg.logging, progress=False)
    with MetricsLogger(logging, run_dir, enabled=True, run_name=cfg.run.name, config=cfg.to_dict(), total_steps=step,
                       start_step=step, wandb_run_id=run_id, metrics_file=False) as logger:
        logger.log(step, values)


def _eval_checkpoint(run_dir, name: str | None):
    from pathlib import Path

    from bigtrain.checkpoint import store as checkpoint

    if name is None:
        folder = checkpoint.find_resume_checkpoint("auto", run_dir, warn=lambda m: print(m, file=sys.stderr))
        if folder is None:
            raise UserError(f"eval: no complete checkpoint in {run_dir / 'checkpoints'}")
        return folder
    path = Path(name)
    if not path.exists() and name.startswith("step-") and name[5:].isdigit():
        path = checkpoint.step_dir(run_dir, int(name[5:]))
    if not path.exists():
        raise UserError(f"eval --checkpoint: no checkpoint '{name}' in {run_dir / 'checkpoints'}")
    checkpoint.verify(path)
    return path


def cmd_verify(args) -> int:
    from pathlib import Path

    from bigtrain.checkpoint import store as checkpoint

    source = Path(args.source)
    folders = [source] if (source / checkpoint.MANIFEST).exists() else checkpoint.list_checkpoints(source)
    if not folders:
        raise UserError(f"verify: no checkpoint in '{source}' (neither a run dir with checkpoints/ nor a checkpoint)")
    damaged = 0
    if (source / "config.yaml").is_file() and not (source / checkpoint.MANIFEST).exists():  # a run dir: its data too
        from bigtrain.config import load_config
        from bigtrain.data import data_cache_path, load_prepared
        from bigtrain.data.prepare import source_configs

        cfg = load_config(source / "config.yaml")
        for data_cfg in source_configs(cfg.data, task=cfg.task.data_task):  # a mixture: each source's cache
            path = data_cache_path(data_cfg, task=cfg.task.data_task)
            try:
                load_prepared(data_cfg, task=cfg.task.data_task, verify=True)
                print(f"ok       data {path}")
            except UserError as e:
                damaged += 1
                print(f"damaged  data {path}: {e}")
    for folder in folders:
        try:
            manifest = checkpoint.verify(folder)
            size = sum(entry["bytes"] for entry in manifest["files"].values())
            print(f"ok       {folder} ({len(manifest['files'])} files, {size / 2**20:,.1f} MiB)")
        except checkpoint.CheckpointError as e:
            damaged += 1
            print(f"damaged  {folder}: {e}")
    if damaged:
        raise UserError(f"verify: {damaged} damaged in '{source}' (listed above)")
    return 0


def cmd_plot(args) -> int:
    from pathlib import Path

    from bigtrain.metrics import METRICS_FILE, plots

    if not plots.have_matplotlib():
        raise UserError(f"plot: matplotlib is not installed — {plots.INSTALL_HINT}")
    runs = {}
    for run in map(Path, args.runs):
        if not (run / METRICS_FILE).is_file():
            raise UserError(f"plot: '{run}' has no {METRICS_FILE} — give a run dir (runs/NAME) that has logged")
        name = run.resolve().name
        runs[name if name not in runs else str(run)] = plots.read_series(run / METRICS_FILE)
    present = {key for series in runs.values() for key in series}
    keys = args.metric or list(dict.fromkeys(k for series in runs.values() for k in plots.default_keys(series)))
    if not keys:
        raise UserError(f"plot: nothing to draw — the {METRICS_FILE} of {', '.join(args.runs)} holds no metrics yet")
    missing = [k for k in keys if k not in present]
    if missing:
        raise UserError(f"plot --metric: no run has {', '.join(missing)} — its keys: {', '.join(sorted(present))}")
    default_out = Path(args.runs[0]) / plots.CURVES_FILE if len(runs) == 1 else Path(plots.CURVES_FILE)
    out = Path(args.output) if args.output else default_out
    try:
        plots.plot_runs(runs, keys, out, log_steps=args.log_steps)
    except OSError as e:
        raise UserError(f"plot: cannot write {out} ({e.strerror or e}) — choose another -o FILE") from None
    print(f"bigtrain: {', '.join(runs)} → {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from bigtrain.checkpoint.export import export, export_hf

    if args.format == "hf":
        out = export_hf(args.source, args.out, dtype=args.dtype, max_shard_bytes=_size_bytes(args.max_shard_size),
                        ema=args.ema, adapter=args.adapter)
    elif args.adapter:
        raise UserError("export --adapter writes a PEFT adapter folder: add --format hf")
    else:
        out = export(args.source, args.out, ema=args.ema)
    print(f"bigtrain: exported {out}" + (" (Hugging Face format)" if args.format == "hf" else ""), file=sys.stderr)
    return 0


def _size_bytes(text: str) -> int:
    """'500MB' / '5GB' / '2GiB' / a plain byte count -> bytes (decimal units, as save_pretrained's)."""
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise UserError(f"export --max-shard-size: cannot read '{text}' — use e.g. 500MB or 5GB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def cmd_generate(args) -> int:
    import json

    from bigtrain.eval.generate import SamplingConfig, generate_text, load_generator, read_prompts

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"generate --device {args.device}: no CUDA device on this machine — use --device cpu")
    gen = load_generator(args.source, dtype=args.dtype, device=args.device)
    completions = generate_text(gen, prompts, sampling, stops=tuple(args.stop), chat=args.chat,
                                use_cache=not args.no_cache, batch_size=args.batch_size,
                                stream=sys.stdout if args.prompt is not None else None)
    if args.prompt is None:
        for prompt, completion in zip(prompts, completions):
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
    return 0
