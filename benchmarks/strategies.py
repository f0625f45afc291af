"""Throughput and per-rank memory of every strategy, 2 processes (torchrun, gloo on CPU / NCCL on GPU).

For each model config and strategy (ddp, fsdp, deepspeed ZeRO-1/2/3) this starts one
`torchrun --nproc_per_node N` job that trains the same recipe with bigtrain's real loop, and records:
tokens/s (median logged step after warmup, all ranks together), each rank's peak host memory (RSS),
and the bytes this rank holds of the parameters and of the optimizer state (local shards only:
FSDP's DTensor `to_local()`, ZeRO-3's `ds_tensor`, ZeRO-1/2's fp32 partition). Strategies are run
one after another, in rounds, so machine noise hits all alike; ratios are against ddp of the same
round.

    python benchmarks/strategies.py [--configs debug 50m] [--rounds 2] [--steps 8] [--warmup 2] [--nproc 2]
    python benchmarks/strategies.py --configs 100m --strategies ddp fsdp fsdp-accum4 fsdp-accum4-no-sync  # FSDP accumulation memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SEQ = 128
CONFIGS = {
    # bigtrain's debug decoder as the recipes ship it.
    "debug": {"arch": "decoder", "preset": "debug", "max_seq_len": SEQ},
    # ~50M parameters: GPT-2 style, 8 layers × 512, vocab 32768 (untied head).
    "50m": {"arch": "decoder", "preset": "debug", "n_layers": 8, "d_model": 512, "n_heads": 8, "d_ff": 2048,
            "max_seq_len": SEQ, "tie_embeddings": False},
    # ~135M parameters: 12 layers × 768, vocab 32768 (untied head).
    "100m": {"arch": "decoder", "preset": "debug", "n_layers": 12, "d_model": 768, "n_heads": 12, "d_ff": 3072,
             "max_seq_len": SEQ, "tie_embeddings": False},
}
VOCAB = {"debug": 8192, "50m": 32768, "100m": 32768}
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
    # FSDP with 4 micro-batches of 1 per step (the others: 1 of 4): gradients reduce-scattered at each
    # micro-batch (the default), or only at the last (fsdp_no_sync: unsharded gradients meanwhile).
    "fsdp-accum4": ["parallel.strategy=fsdp", "train.micro_batch_size=1"],
    "fsdp-accum4-no-sync": ["parallel.strategy=fsdp", "train.micro_batch_size=1", "parallel.fsdp_no_sync=true"],
}


def recipe(out: Path, config: str, steps: int, nproc: int) -> dict:
    return {
        "run": {"name": "bench", "output_dir": str(out), "seed": 0},
        "model": CONFIGS[config],
        "data": {"source": "python-stdlib", "vocab_size": VOCAB[config], "seq_len": SEQ},
        "train": {"max_steps": steps, "global_batch_size": 4 * nproc, "micro_batch_size": 4},
        "optim": {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "checkpoint": {"every": 0, "resume": "none", "keep_last": 1},
        "eval": {"max_samples": 8},
        "logging": {"every": 1, "progress": False, "wandb": "disabled"},
        "parallel": {"precision": "fp32"},  # the same numbers on every CPU (auto picks bf16 where it is native)
    }


def _local(t) -> "torch.Tensor":
    t = getattr(t, "ds_tensor", t)  # ZeRO-3: this rank's partition of the parameter
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2: this rank's shard


def local_bytes(engine) -> tuple[int, int]:
    """Bytes of parameters and of optimizer state held by this rank (tied weights counted once)."""
    params = {id(p): p for p in engine.module.parameters()}.values()
    param_bytes = sum(_local(p).numel() * _local(p).element_size() for p in params)
    optimizer = getattr(engine, "ds", None)
    if optimizer is not None:  # DeepSpeed: the fp32 partitions its ZeRO optimizer keeps, plus Adam's moments
        zero = engine.ds.optimizer
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", [])
        extra = sum(m.numel() * m.element_size() for m in masters)
    else:
        extra = 0
    state = [v for s in engine.optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.numel() > 1]
    return param_bytes, extra + sum(_local(v).numel() * _local(v).element_size() for v in state)


def worker(recipe_path: str, overrides: list[str], out: str, warmup: int) -> None:
    """(In each torchrun process.) Train; rank r writes out.r.json with its figures."""
    import resource

    from bigtrain.config import load_config
    from bigtrain.run import run_training

    ctx = run_training(load_config(recipe_path, overrides))
    params, optim = local_bytes(ctx.engine)
    rank = ctx.dist.rank
    figures = {"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "param_mb": params / 2**20, "optim_mb": optim / 2**20,
               "n_params": sum(p.numel() for p in {id(p): p for p in ctx.engine.module.parameters()}.values())}
    if rank == 0:
        figures["tokens_per_sec"] = statistics.median(r["perf/tokens_per_sec"] for r in ctx.history[warmup:])
    Path(f"{out}.{rank}.json").write_text(json.dumps(figures))


def measure(config: str, strategy: str, args, tmp: Path) -> dict:
    path = tmp / f"{config}.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(recipe(tmp / "runs", config, args.steps, args.nproc)))
        # Tokenizer training and packing happen once here, not inside the first measured run.
        subprocess.run([sys.executable, "-m", "bigtrain", "prepare", str(path)], check=True, cwd=REPO,
                       capture_output=True)
    out = tmp / f"{config}-{strategy}"
    overrides = [f"run.name={config}-{strategy}", *STRATEGIES[strategy], *args.overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker", str(path), str(out), str(args.warmup), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{config} {strategy} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(args.nproc)]
    return {"tokens_per_sec": ranks[0]["tokens_per_sec"], "n_params": ranks[0]["n_params"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "param_mb": max(r["param_mb"] for r in ranks),
            "optim_mb": max(r["optim_mb"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["debug", "50m"], choices=list(CONFIGS))
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero1", "zero2", "zero3"], choices=list(STRATEGIES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. parallel.precision=bf16")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            rounds = [{s: measure(config, s, args, Path(tmp)) for s in args.strategies} for _ in range(args.rounds)]
            n = rounds[0][args.strategies[0]]["n_params"]
            print(f"\n{config}: {n / 1e6:.1f}M parameters, {args.nproc} ranks, seq {SEQ}, micro 4 "
                  f"{' '.join(args.overrides)}")
            print("| strategy | tokens/s | vs ddp (per round) | peak RSS / rank MB | params / rank MB | optimizer state / rank MB |")
            print("| --- | --- | --- | --- | --- | --- |")
            for s in args.strategies:
                tps = [r[s]["tokens_per_sec"] for r in rounds]
                ratios = [r[s]["tokens_per_sec"] / r["ddp"]["tokens_per_sec"] for r in rounds] if "ddp" in rounds[0] else []
                last = rounds[-1][s]
                vs_ddp = f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})" if ratios else "—"
                print(f"| {s} | {statistics.median(tps):,.0f} | {vs_ddp} | "
                      f"{max(r[s]['peak_rss_mb'] for r in rounds):,.0f} | {last['param_mb']:,.1f} | {last['optim_mb']:,.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[5:], sys.argv[3], int(sys.argv[4]))
    else:
        main()
