"""bigtrain's loop overhead against a bare PyTorch loop, measured side by side.

Both step the same model (bigtrain's decoder, GPT-2 style: 6 layers × 384, seq 256, batch 8,
~14M parameters), the same AdamW, dtype and clipping, on the same packed token data. The bare
loop is nanoGPT-shaped: fetch a batch from the memmapped shard, forward (autocast for bf16),
mean cross-entropy, backward, clip, step. Each measurement is a fresh process; the two are
interleaved round by round so machine noise hits both alike. Tokens/s is taken from the median
step time after warmup.

    python benchmarks/overhead.py [--rounds 3] [--steps 15] [--warmup 3] [--precisions fp32 bf16]

`--in-process` instead alternates SINGLE steps of the two loops inside one process (bigtrain's
real `loop.train`, one step per call, with its metrics logging on) — far less exposed to the
noise of a shared machine than whole runs, at the price of leaving out process start-up.

`--slow-read F` simulates a slow filesystem: reading a batch sleeps F × the bare loop's step (measured
first), in both loops. The bare loop reads synchronously, so its step grows by that; bigtrain's loop
(`loop.train` over the whole run, in this process, bench mode) reads the next step's samples on its
batch thread while a step runs. Rounds alternate the two; tokens/s from the median step after warmup.

    python benchmarks/overhead.py --slow-read 0.25 --rounds 3 --steps 12 --warmup 2 --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.bare, here and in the bare loop's process (run from REPO)
SEQ, BATCH = 256, 8
MODEL = {"arch": "decoder", "preset": "debug", "n_layers": 6, "d_model": 384, "n_heads": 6, "d_ff": 1536,
         "max_seq_len": SEQ}


def recipe(out: Path, precision: str, steps: int) -> dict:
    return {
        "run": {"name": f"overhead-{precision}", "output_dir": str(out), "seed": 0},
        "model": MODEL,
        "data": {"source": "python-stdlib", "vocab_size": 8192, "seq_len": SEQ},
        "train": {"max_steps": steps, "global_batch_size": BATCH, "micro_batch_size": BATCH},
        "optim": {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "parallel": {"precision": precision},
        "checkpoint": {"every": 0, "resume": "none", "keep_last": 1},
        "eval": {"max_samples": 8},
        "logging": {"every": 1, "progress": False},
    }


BARE_LOOP = r'''
import json, sys, time
import numpy as np, torch
from benchmarks.bare import bare_optimizer, bare_step
from bigtrain.config import build_config
from bigtrain.data import load_prepared
from bigtrain.models import build_model

cfg = build_config(json.loads(sys.argv[1]))
steps = int(sys.argv[2])
data = load_prepared(cfg.data, verify=False)
tokens = data.train.read(0, data.train.num_tokens)        # the same packed stream bigtrain trains on
torch.manual_seed(0)
model = build_model(cfg.model, -(-data.vocab_size // 64) * 64)
opt = bare_optimizer(model)
dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else None
rng = np.random.default_rng(0)
B, T = cfg.train.micro_batch_size, cfg.data.seq_len
times = []
for step in range(steps):
    t0 = time.perf_counter()
    starts = rng.integers(0, len(tokens) - T - 1, B)
    bare_step(model, opt, torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts])), dtype).item()
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
'''


def bare_step_times(cfg: dict, steps: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", BARE_LOOP, json.dumps(cfg), str(steps)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bigtrain_step_times(cfg: dict, path: Path) -> list[float]:
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "bigtrain", "train", str(path)], capture_output=True, text=True, check=True)
    run_dir = Path(cfg["run"]["output_dir"]) / cfg["run"]["name"]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/step_time_s"] for r in records if "perf/step_time_s" in r]


def in_process(precision: str, steps: int, warmup: int, tmp: Path) -> None:
    import dataclasses

    import numpy as np
    import torch

    from benchmarks.bare import bare_optimizer, bare_step
    from bigtrain.checkpoint import TrainState
    from bigtrain.config import build_config
    from bigtrain.train.context import LoopContext
    from bigtrain.train.loop import train
    from bigtrain.core.hardware import peak_flops_per_sec
    from bigtrain.metrics import MetricsLogger
    from bigtrain.models import build_model
    from bigtrain.train.build import build, padded_vocab_size
    from bigtrain.parallel import init_distributed

    cfg = build_config(recipe(tmp, precision, warmup + steps))
    dist = init_distributed("cpu")
    b = build(cfg, dist)
    logger = MetricsLogger(cfg.logging, cfg.run_dir(), enabled=True, run_name="x", config={}, total_steps=cfg.train.max_steps)
    ctx = LoopContext(cfg=cfg, dist=dist, engine=b.engine, task=b.task, train_data=b.data.train,
                      val_data=b.data.validation, logger=logger, flops_per_token=b.model.flops_per_token(SEQ),
                      peak_flops_per_sec=peak_flops_per_sec(dist.device, b.engine.precision.compute),
                      save_checkpoint=lambda s: None, bench=True)  # no eval/checkpoint at each one-step call
    state = TrainState()

    torch.manual_seed(0)
    model = build_model(cfg.model, padded_vocab_size(b.data.vocab_size))
    opt = bare_optimizer(model)
    tokens = b.data.train.read(0, b.data.train.num_tokens)
    rng = np.random.default_rng(0)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def bare() -> None:
        starts = rng.integers(0, len(tokens) - SEQ - 1, BATCH)
        bare_step(model, opt, torch.from_numpy(np.stack([tokens[s:s + SEQ + 1] for s in starts])), dtype).item()

    def ours_step() -> None:
        ctx.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_at_step=state.step + 1))
        train(ctx, state)

    ratios = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        bare()
        t1 = time.perf_counter()
        ours_step()
        t2 = time.perf_counter()
        if i >= warmup:
            ratios.append((t1 - t0) / (t2 - t1))
    logger.close()
    print(f"{precision} in-process: bigtrain/bare tokens/s ratio median {statistics.median(ratios):.3f} over {steps} "
          f"step pairs (quartiles {np.percentile(ratios, 25):.3f}–{np.percentile(ratios, 75):.3f})", flush=True)


class SlowReads:
    """A dataset whose every sample takes `delay` seconds to read (a slow filesystem)."""

    def __init__(self, data, delay: float):
        self.data, self.delay = data, delay

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.data[i]


def slow_read(precision: str, steps: int, warmup: int, rounds: int, fraction: float, tmp: Path) -> None:
    import dataclasses

    import numpy as np
    import torch

    from benchmarks.bare import bare_optimizer, bare_step
    from bigtrain.checkpoint import TrainState
    from bigtrain.config import build_config
    from bigtrain.core.hardware import peak_flops_per_sec
    from bigtrain.train.context import LoopContext
    from bigtrain.train.loop import train
    from bigtrain.metrics import MetricsLogger
    from bigtrain.models import build_model
    from bigtrain.train.build import build, padded_vocab_size
    from bigtrain.parallel import init_distributed

    cfg = build_config(recipe(tmp, precision, warmup + steps))
    dist = init_distributed("cpu")
    b = build(cfg, dist)
    torch.manual_seed(0)
    model = build_model(cfg.model, padded_vocab_size(b.data.vocab_size))
    opt = bare_optimizer(model)
    tokens = b.data.train.read(0, b.data.train.num_tokens)
    rng = np.random.default_rng(0)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def bare(delay: float) -> float:
        t0 = time.perf_counter()
        time.sleep(delay)  # the synchronous read of a slow filesystem
        starts = rng.integers(0, len(tokens) - SEQ - 1, BATCH)
        bare_step(model, opt, torch.from_numpy(np.stack([tokens[s:s + SEQ + 1] for s in starts])), dtype).item()
        return time.perf_counter() - t0

    base = statistics.median([bare(0.0) for _ in range(warmup + 3)][warmup:])
    delay = fraction * base
    print(f"{precision} slow read: a bare step takes {base:.3f} s; reading a batch now sleeps {delay:.3f} s", flush=True)
    ratios, waits = [], []
    for r in range(rounds):
        bare_s = statistics.median([bare(delay) for _ in range(warmup + steps)][warmup:])
        logger = MetricsLogger(cfg.logging, tmp / f"slow-{r}", enabled=True, run_name="x", config={},
                               total_steps=cfg.train.max_steps)
        ctx = LoopContext(cfg=cfg, dist=dist, engine=b.engine, task=b.task,
                          train_data=SlowReads(b.data.train, delay / BATCH), val_data=b.data.validation,
                          logger=logger, flops_per_token=b.model.flops_per_token(SEQ),
                          peak_flops_per_sec=peak_flops_per_sec(dist.device, b.engine.precision.compute),
                          save_checkpoint=lambda s: None, bench=True)
        ctx.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=warmup + steps))
        train(ctx, TrainState())
        logger.close()
        measured = ctx.history[warmup:]
        ours = statistics.median(x["perf/step_time_s"] for x in measured)
        waits.append(statistics.median(x["perf/data_wait_frac"] for x in measured))
        ratios.append(bare_s / ours)
        print(f"{precision} slow read round {r}: bare step {bare_s:.3f} s · bigtrain step {ours:.3f} s · "
              f"ratio {ratios[-1]:.3f} · bigtrain data wait {100 * waits[-1]:.1f}%", flush=True)
    print(f"{precision} slow read ({fraction:g} × a step per batch): bigtrain/bare tokens/s ratio median "
          f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)}) · bigtrain data wait "
          f"{100 * statistics.median(waits):.1f}% of step time", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--in-process", action="store_true", help="alternate single steps in one process")
    parser.add_argument("--slow-read", type=float, metavar="F",
                        help="reading a batch sleeps F × a bare step: bare (synchronous) vs bigtrain (overlapped)")
    args = parser.parse_args()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.slow_read is not None:
            for precision in args.precisions:
                slow_read(precision, args.steps, args.warmup, args.rounds, args.slow_read, tmp)
            return
        if args.in_process:
            for precision in args.precisions:
                in_process(precision, args.steps, args.warmup, tmp)
            return
        subprocess.run([sys.executable, "-m", "bigtrain", "prepare", str(_write(tmp / "prep.yaml", recipe(tmp, "fp32", 1)))],
                       check=True, capture_output=True)
        for precision in args.precisions:
            ratios, bare_tps, ours_tps, waits = [], [], [], []
            for r in range(args.rounds):
                cfg = recipe(tmp / f"r{r}", precision, total)
                bare = statistics.median(bare_step_times(cfg, total)[args.warmup:])
                ours_times = bigtrain_step_times(cfg, tmp / f"{precision}-{r}.yaml")[args.warmup:]
                ours = statistics.median(ours_times)
                bare_tps.append(BATCH * SEQ / bare)
                ours_tps.append(BATCH * SEQ / ours)
                ratios.append(bare / ours)
                records = [json.loads(l) for l in (tmp / f"r{r}" / cfg["run"]["name"] / "metrics.jsonl").read_text().splitlines()]
                waits += [x["perf/data_wait_frac"] for x in records[args.warmup:] if "perf/data_wait_frac" in x]
                print(f"{precision} round {r}: bare {bare_tps[-1]:,.0f} tok/s · bigtrain {ours_tps[-1]:,.0f} tok/s · "
                      f"ratio {ratios[-1]:.3f}", flush=True)
            mfus = [x["perf/mfu"] for x in records[args.warmup:] if "perf/mfu" in x]
            print(f"{precision}: bigtrain/bare tokens/s ratio median {statistics.median(ratios):.3f} "
                  f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}) · bare {statistics.median(bare_tps):,.0f} tok/s · "
                  f"bigtrain {statistics.median(ours_tps):,.0f} tok/s · perf/mfu {statistics.median(mfus):.3f} · "
                  f"data wait {100 * statistics.median(waits):.2f}% of step time", flush=True)


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
