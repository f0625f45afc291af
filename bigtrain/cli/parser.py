"""The `bigtrain` argument parser: every subcommand's flags and help, one function per subcommand (the recipe
commands share one). Added in the order `bigtrain -h` lists them."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Train transformer LMs from one recipe, one core to many nodes.")
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recipe_commands(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_verify(sub)
    _add_plot(sub)
    sub.add_parser("launch", help="start training on this node under torchrun, deepspeed or accelerate (see `bigtrain launch -h`)",
                   add_help=False, prefix_chars="\0")  # its own flags: parsed by launcher.cli
    return parser


def _add_recipe_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override recipe values")
    return p


def _add_recipe_commands(sub) -> None:
    """train, check, prepare, bench: a recipe and its overrides."""
    _add_recipe_command(sub, "train", "train per the recipe: one process, or every rank of a job started by torchrun, "
                                      "deepspeed, accelerate launch or `bigtrain launch` (parallel.strategy: single, "
                                      "ddp, fsdp, deepspeed)")
    check = _add_recipe_command(sub, "check", "validate a recipe (or several: `bigtrain check recipes/*.yaml`, the "
                                              "overrides apply to each); print parameters, FLOPs/token, the memory "
                                              "plan per rank, and the precision it resolves to on this machine")
    check.add_argument("--keys", action="store_true", help="also list every recipe key with its help")
    check.add_argument("--world-size", type=int, help="ranks the job will run on (default: WORLD_SIZE, else 1)")
    check.add_argument("--nodes", type=int, default=1, help="nodes those ranks are spread over (default 1)")
    check.add_argument("--device-memory-gb", type=float, metavar="GB",
                       help="say whether the plan's peak fits a device of this many GB (exit 1 if not)")
    prep = _add_recipe_command(sub, "prepare", "tokenize and pack the recipe's data once into the cache")
    prep.add_argument("--workers", type=int, default=None,
                      help="processes tokenizing at once (default: every CPU this process may use)")
    prep.add_argument("--verify", action="store_true",
                      help="check every byte of the prepared cache again (otherwise once, the first time it is opened)")
    bench = _add_recipe_command(sub, "bench", "measure tokens/s, MFU and the step-time breakdown")
    bench.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")


def _add_eval(sub) -> None:
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


def _add_export(sub) -> None:
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


def _add_generate(sub) -> None:
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


def _add_verify(sub) -> None:
    ver = sub.add_parser("verify", help="check every byte of a run's checkpoints (or one checkpoint) against its manifest",
                         description="check each file's size and sha256 against the manifest, for every checkpoint "
                                     "of a run dir or one checkpoint folder (resume checks the one it takes, the "
                                     "ranks sharing the files); exit 2 if any is damaged")
    ver.add_argument("source", help="run dir or checkpoint folder")


def _add_plot(sub) -> None:
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
