"""Tokens/s and MFU of bigtrain against a bare PyTorch loop on one GPU: one prepared script for a lent GPU machine.

Two shapes, GPT-2 124M (seq 1024, vocab 50,257) and Llama 3.2 1B (seq 2048, vocab 128,256), bf16, eager and
compiled (per block, as parallel.compile does), each measured twice in a fresh process: bigtrain (`bigtrain bench`
on a recipe: its real loop, with the prefetching batch thread, the pinned side-stream copies and its one host
read per step) and a bare loop (the same model class, fused AdamW, bf16 autocast, clipping, batches cut from
the same token stream already on the device: no input pipeline at all). MFU = FLOPs/token × tokens/s / the
datasheet bf16 peak (bigtrain.core.hardware), FLOPs/token from the model's shape (PaLM convention, as
`bigtrain check` prints it), the same figure for both loops.

Data: a word-level tokenizer of exactly the shape's vocabulary (tokenizers' WordLevel: the model's embedding and
head are the real sizes) and random documents of its words, written and prepared once per vocabulary.

    python benchmarks/gpu.py --out DIR              # on the GPU machine (≈ 8 min on an H200); DIR/gpu.json
    python benchmarks/gpu.py --smoke --out DIR      # the same script, tiny shapes, on a CPU (checks it runs)

Wheels the device image lacks (deepspeed, datasets, wandb, ...) travel as the device README says.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

SHAPES = {  # name -> (model section, vocabulary, seq_len, micro-batch)
    "gpt2-124m": ({"preset": "gpt2-124m", "max_seq_len": 1024}, 50_257, 1024, 16),
    "llama-1b": ({"preset": "llama-1b", "max_seq_len": 2048}, 128_256, 2048, 4),
}
SMOKE = {"debug": ({"preset": "debug", "max_seq_len": 64}, 512, 64, 4)}


def write_data(folder: Path, vocab: int, tokens: int) -> tuple[Path, Path]:
    """A WordLevel tokenizer.json of `vocab` entries (the EOS first) and a jsonl of random documents of its words."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<|endoftext|>"] + [f"w{i}" for i in range(1, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(-(-tokens // 4000)):
            ids = rng.integers(1, vocab, 4000)
            f.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
    return folder / "tokenizer.json", folder / "docs.jsonl"


def recipe(out: Path, name: str, shape: tuple, compiled: bool, device: str, precision: str, data: tuple[Path, Path],
           steps: int) -> dict:
    model, _, seq, micro = shape
    return {
        "run": {"name": name, "output_dir": str(out / "runs"), "seed": 0},
        "model": {"arch": "decoder", **model},
        "data": {"source": str(data[1]), "tokenizer": str(data[0]), "seq_len": seq, "cache_dir": str(out / "cache"),
                 "validation_split": 0.01},
        "task": {"name": "causal_lm"},
        "train": {"max_steps": steps, "global_batch_size": micro, "micro_batch_size": micro},
        "optim": {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "parallel": {"strategy": "single", "device": device, "precision": precision, "compile": compiled},
        "checkpoint": {"every": 0, "resume": "none"},
        "logging": {"every": 1, "progress": False, "wandb": "disabled"},
    }


BARE_LOOP = r'''
import json, sys, time
import torch
from benchmarks.bare import bare_optimizer, bare_step
from bigtrain.config import build_config
from bigtrain.data import load_prepared
from bigtrain.models import build_model
from bigtrain.train.build import padded_vocab_size

cfg = build_config(json.loads(sys.argv[1]))
warmup, steps = int(sys.argv[2]), int(sys.argv[3])
device = torch.device(cfg.parallel.device)
data = load_prepared(cfg.data, verify=False)
stream = torch.from_numpy(data.train.read(0, data.train.num_tokens).astype("int64")).to(device)  # no input pipeline
torch.manual_seed(0)
model = build_model(cfg.model, padded_vocab_size(data.vocab_size)).to(device)
if cfg.parallel.compile:
    for block in model.blocks:
        block.compile()
opt = bare_optimizer(model, fused=device.type == "cuda")
dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else None
B, T = cfg.train.micro_batch_size, cfg.data.seq_len
gen = torch.Generator(device=device).manual_seed(0)
offsets = torch.arange(T + 1, device=device)

def step():
    starts = torch.randint(0, len(stream) - T - 1, (B,), device=device, generator=gen)
    return bare_step(model, opt, stream[starts[:, None] + offsets], dtype)

for _ in range(warmup):
    step().item()
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
sync()
t0 = time.perf_counter()
for _ in range(steps):
    loss = step()
loss.item()
sync()
mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
print(json.dumps({"tokens_per_sec": steps * B * T / (time.perf_counter() - t0), "max_memory_gb": mem}))
'''


def run(cmd: list[str], log) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    log.write(f"$ {' '.join(cmd)}\n({time.perf_counter() - t0:.1f} s, exit {out.returncode})\n{out.stdout}\n"
              f"{out.stderr[-6000:]}\n")
    log.flush()
    if out.returncode:
        raise RuntimeError(f"{cmd[:4]} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def bigtrain_bench(path: Path, warmup: int, steps: int, log) -> dict:
    text = run([sys.executable, "-m", "bigtrain", "bench", str(path), "--warmup", str(warmup), "--steps", str(steps)],
               log)
    number = lambda label: float(re.search(rf"^{label}\s+([\d.,]+)", text, re.M).group(1).replace(",", ""))  # noqa: E731
    compiled = re.search(r"^compile\s+(\d+) graphs, (\d+) of them recompiled", text, re.M)
    return {"tokens_per_sec": number("tokens/s"), "mfu": number("MFU"), "max_memory_gb": number("memory"),
            "recompiled": int(compiled.group(2)) if compiled else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, fp32: checks the script runs")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--shapes", nargs="*", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from bigtrain.config import build_config
    from bigtrain.core.hardware import peak_flops_per_sec
    from bigtrain.models import resolve_model_spec, spec_flops_per_token
    from bigtrain.train.build import padded_vocab_size

    shapes = SMOKE if args.smoke else SHAPES
    device, precision = ("cpu", "fp32") if args.smoke else ("cuda", "bf16")
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    peak = peak_flops_per_sec(torch.device(device), torch.float32 if args.smoke else torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "peak_flops_per_sec": peak, "date": time.strftime("%Y-%m-%d"), "warmup": warmup, "steps": steps,
               "runs": []}
    with open(args.out / "gpu.log", "w") as log:
        for name in args.shapes or shapes:
            shape = shapes[name]
            _, vocab, seq, micro = shape
            data = write_data(args.out / f"data-{vocab}", vocab, tokens=(warmup + steps + 2) * micro * (seq + 1) * 2)
            for compiled in (False, True):
                cfg = recipe(args.out, f"{name}-{'compiled' if compiled else 'eager'}", shape, compiled, device,
                             precision, data, warmup + steps)
                path = args.out / f"{cfg['run']['name']}.yaml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                run([sys.executable, "-m", "bigtrain", "prepare", str(path)], log)
                spec = resolve_model_spec(build_config(cfg).model, padded_vocab_size(vocab))
                flops = spec_flops_per_token(spec, seq)
                ours = bigtrain_bench(path, warmup, steps, log)
                bare = json.loads(run([sys.executable, "-c", BARE_LOOP, json.dumps(cfg), str(warmup), str(steps)],
                                      log).strip().splitlines()[-1])
                bare["mfu"] = flops * bare["tokens_per_sec"] / peak
                row = {"shape": name, "compiled": compiled, "tokens": micro * seq, "flops_per_token": flops,
                       "bigtrain": ours, "bare": bare, "ratio": ours["tokens_per_sec"] / bare["tokens_per_sec"]}
                results["runs"].append(row)
                print(f"{name:10s} {'compiled' if compiled else 'eager':8s} bigtrain {ours['tokens_per_sec']:>10,.0f} "
                      f"tok/s MFU {ours['mfu']:.3f} {ours['max_memory_gb']:.1f} GB · bare {bare['tokens_per_sec']:>10,.0f} "
                      f"tok/s MFU {bare['mfu']:.3f} · ratio {row['ratio']:.3f}"
                      + (f" · recompiled {ours['recompiled']}" if compiled else ""), flush=True)
                (args.out / "gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
