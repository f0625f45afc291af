"""`bigtrain eval` (the task's metrics, or lm-eval tasks with --tasks), `generate` and `plot`: the commands that
use a trained run: score a checkpoint, sample from it, draw the curves its metrics.jsonl logged."""

from __future__ import annotations

import dataclasses
import os
import sys

from bigtrain.cli.recipe import with_launcher_choices
from bigtrain.core import safe_load
from bigtrain.core.errors import UserError


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from bigtrain import checkpoint
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
    cfg = load_config(run_dir / "config.yaml", with_launcher_choices(run_dir / "config.yaml", overrides))
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

    from bigtrain import checkpoint
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
    from bigtrain.eval.generator import load_generator

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

    from bigtrain import checkpoint

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


def cmd_generate(args) -> int:
    import json

    from bigtrain.eval.generate import SamplingConfig, generate_text, read_prompts
    from bigtrain.eval.generator import load_generator

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
