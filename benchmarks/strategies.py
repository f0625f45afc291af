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
    python benchmarks/strategies.py --configs 100m --strategies ddp fsdp zero3 --phase build      # build peak
    python benchmarks/strategies.py --configs 100m --strategies ddp fsdp zero3 --phase init_from  # + init_from

`--phase build` / `init_from` build the model and engine as training does, take one training step, and
report each rank's peak anonymous memory (RssAnon, sampled every 2 ms: heap and tensors, not the page cache
of a memory-mapped checkpoint) while building the model, wrapping it in the engine, loading init_from's
weights (`init_from` first trains one step in one process for the checkpoint it then loads) and taking that
first step, when ddp and fsdp allocate their optimizer state (DeepSpeed does when its engine is made).
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
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import torch

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


class AnonPeak:
    """Peak anonymous memory (RssAnon: heap and tensors, not file pages such as a memory-mapped checkpoint)
    of this process, sampled every 2 ms in a thread; `phase()` returns the peak since the last call in MB."""

    def __init__(self):
        import threading

        self._peak = self.now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.now_mb())

    def phase(self) -> float:
        peak, self._peak = max(self._peak, self.now_mb()), self.now_mb()
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def build_only(cfg, out: str) -> None:
    """(In each torchrun process.) Build data, model and engine as training does (with init_from's weights),
    then stop: rank r writes out.r.json with the peak anonymous memory of each part of the build."""
    import bigtrain.train.build
    from bigtrain.train.build import build, with_init_from
    from bigtrain.train.run import init_job, resolve_for_job
    from bigtrain.parallel import shutdown

    cfg = with_init_from(cfg)
    dist = init_job(cfg)
    job_cfg, _ = resolve_for_job(cfg, dist)
    anon = AnonPeak()
    peaks = {"start": anon.phase()}
    build_engine = bigtrain.train.build.build_engine

    def timed_build_engine(*args, **kwargs):  # the model is built (init_from's tensors not read yet)
        peaks["model"] = anon.phase()
        engine = build_engine(*args, **kwargs)
        peaks["engine"] = anon.phase()
        return engine

    bigtrain.train.build.build_engine = timed_build_engine
    built = build(job_cfg, dist)
    peaks["load"] = anon.phase()  # loading init_from's weights into the engine
    # One training step (one micro-batch): ddp and fsdp allocate gradients and Adam's moments here, DeepSpeed
    # when its engine was made, so start-up peaks compare only once every strategy holds its training state.
    from bigtrain.train.loop import accumulate_gradients

    engine, micro = built.engine, cfg.train.micro_batch_size
    batch = built.task.collate([built.data.train[i] for i in range(micro)], range(micro), dist.device)
    accumulate_gradients(engine, built.task, [batch], 1.0)
    engine.clip_grad_norm(cfg.optim.grad_clip)
    engine.step(True)
    peaks["step"] = anon.phase()
    anon.close()
    params, optim = local_bytes(built.engine)
    base = peaks["start"]
    Path(f"{out}.{dist.rank}.json").write_text(json.dumps({
        "rank": dist.rank, "peak_rss_mb": max(peaks.values()), "base_mb": base,
        **{f"{k}_rss_mb": peaks[k] - base for k in ("model", "engine", "load", "step")},
        "param_mb": params / 2**20, "optim_mb": optim / 2**20, "tokens_per_sec": 0.0,
        "n_params": built.model.num_params()}))
    built.engine.close()
    shutdown(dist)


def worker(recipe_path: str, overrides: list[str], out: str, warmup: int) -> None:
    """(In each torchrun process.) Train; rank r writes out.r.json with its figures."""
    import resource

    from bigtrain.config import load_config
    from bigtrain.train.run import run_training

    if warmup < 0:  # --phase build / init_from
        build_only(load_config(recipe_path, overrides), out)
        return
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
    if args.phase == "init_from":
        source = tmp / "runs" / f"{config}-source"
        if not source.exists():  # one step in one process: the checkpoint every strategy then loads
            subprocess.run([sys.executable, "-m", "bigtrain", "train", str(path), f"run.name={config}-source",
                            "train.max_steps=1", "train.micro_batch_size=4", "train.global_batch_size=4"],
                           check=True, cwd=REPO, capture_output=True)
        overrides.append(f"model.init_from={source}")
    warmup = args.warmup if args.phase == "train" else -1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker", str(path), str(out), str(warmup), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{config} {strategy} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(args.nproc)]
    return {"tokens_per_sec": ranks[0]["tokens_per_sec"], "n_params": ranks[0]["n_params"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "param_mb": max(r["param_mb"] for r in ranks),
            "optim_mb": max(r["optim_mb"] for r in ranks),
            **{key: max(r.get(key, 0.0) for r in ranks) for key in ("base_mb", "model_rss_mb", "engine_rss_mb", "load_rss_mb", "step_rss_mb")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["debug", "50m"], choices=list(CONFIGS))
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero1", "zero2", "zero3"], choices=list(STRATEGIES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--phase", choices=["train", "build", "init_from"], default="train",
                   help="train (throughput + peak memory), or stop once the engine is built (with model.init_from)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. parallel.precision=bf16")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            rounds = [{s: measure(config, s, args, Path(tmp)) for s in args.strategies} for _ in range(args.rounds)]
            n = rounds[0][args.strategies[0]]["n_params"]
            print(f"\n{config}: {n / 1e6:.1f}M parameters, {args.nproc} ranks, seq {SEQ}, micro 4 "
                  f"{' '.join(args.overrides)}")
            if args.phase != "train":
                print("Peak anonymous memory per rank (RssAnon, max over ranks, median over rounds) above the process's "
                      "memory before the build (its imports, the data), during each part of the build; ratio vs ddp")
                print("| strategy | before MB | model build MB | vs ddp | engine (wrap + optimizer) MB | init_from load MB "
                      "| vs ddp | first step MB | start-up peak MB | vs ddp | params / rank MB |")
                print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

                def median(s, key):
                    return statistics.median(r[s][key] for r in rounds)

                def vs(s, key):
                    return median(s, key) / median("ddp", key) if "ddp" in rounds[0] else float("nan")

                for r in rounds:  # the highest point of the whole start-up: build, engine, load, first step
                    for figures in r.values():
                        figures["startup_rss_mb"] = max(figures[f"{k}_rss_mb"] for k in ("model", "engine", "load", "step"))
                for s in args.strategies:
                    print(f"| {s} | {median(s, 'base_mb'):,.0f} | {median(s, 'model_rss_mb'):,.0f} | "
                          f"{vs(s, 'model_rss_mb'):.2f} | {median(s, 'engine_rss_mb'):,.0f} | "
                          f"{median(s, 'load_rss_mb'):,.0f} | {vs(s, 'load_rss_mb'):.2f} | {median(s, 'step_rss_mb'):,.0f} | "
                          f"{median(s, 'startup_rss_mb'):,.0f} | {vs(s, 'startup_rss_mb'):.2f} | {rounds[-1][s]['param_mb']:,.1f} |")
                continue
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
