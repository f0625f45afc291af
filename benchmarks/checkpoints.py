"""Checkpoint cost on 2 processes (torchrun; gloo on CPU): the training loop's stall per checkpoint with
`checkpoint.async_save` false vs true, and save + verify time against checkpoint size.

stall: one torchrun job of bigtrain's real loop per (strategy, mode) on a config of strategies.py (default
`100m`, 135.5M parameters), saving every `--every` steps. Per periodic save: the seconds the training thread
spent in it (`Checkpointer.history`: for async the copy to host memory, for sync everything) and until it was
durable; and the loop's cost per checkpoint, (Σ step times + Σ stalls − the same for a run without periodic
checkpoints) / saves, which also counts the background thread slowing the steps it overlaps.

sizes: one torchrun job that builds FSDP engines of each size, takes one optimizer step (so the Adam state
exists), and times a synchronous save (write, fsync, checksums, manifest, rename: a preemption's save) and a
collective `verify` of it. Saves alternate between files hashed as they are written (bigtrain/core/filehash.py,
the default) and the manifest reading every file back after writing (as before), two of each. A least-squares
line t = a + b · bytes per rank gives the measured rate; the preemption budget (120 s at 1 GB/s per node) is
then worked out from it.

    python benchmarks/checkpoints.py [--config 100m] [--strategies ddp fsdp] [--steps 7] [--every 2]
                                     [--sizes debug 50m 100m] [--nproc 2]
    python benchmarks/checkpoints.py --strategies --sizes debug 50m 100m    # only save + verify vs size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from strategies import CONFIGS, REPO, VOCAB, recipe

STRATEGIES = {"ddp": ["parallel.strategy=ddp"], "fsdp": ["parallel.strategy=fsdp"]}
MODES = {"none": ["checkpoint.every=0"], "sync": ["checkpoint.async_save=false"], "async": ["checkpoint.async_save=true"]}


def loop_worker(recipe_path: str, overrides: list[str], out: str) -> None:
    """(In each torchrun process.) Train; rank 0 writes out.json: step times and the saves' history."""
    from bigtrain.config import load_config
    from bigtrain.train.run import run_training

    ctx = run_training(load_config(recipe_path, overrides))
    if ctx.dist.rank == 0:
        Path(f"{out}.json").write_text(json.dumps({
            "step_time_s": [r["perf/step_time_s"] for r in ctx.history],
            "saves": ctx.save_checkpoint.__self__.history}))


def sizes_worker(sizes: list[str], out: str) -> None:
    """(In each torchrun process.) Per size: FSDP engine, one step, timed sync save and collective verify."""
    import torch

    from bigtrain import checkpoint

    from bigtrain.core import filehash
    from bigtrain.config import ModelConfig, OptimConfig, ParallelConfig, dump_yaml, Config
    from bigtrain.models import build_model
    from bigtrain.train.optim import build_optimizer
    from bigtrain.parallel import barrier, build_engine, init_distributed

    dist = init_distributed("cpu")
    rows = []
    for name in sizes:
        torch.manual_seed(0)
        model = build_model(ModelConfig(**CONFIGS[name]), VOCAB[name], device="meta")
        engine = build_engine(ParallelConfig(strategy="fsdp", precision="fp32"), model,
                              lambda m: build_optimizer(OptimConfig(lr=1e-4), m, dist.device), dist)
        tokens = torch.randint(0, VOCAB[name], (1, 128))
        engine.backward(engine.model(tokens).float().mean())
        engine.step(True)
        run_dir = Path(out).parent / f"sizes-{name}"
        times = {"save_s": [], "readback_save_s": [], "verify_s": []}
        for mode in ("readback_save_s", "save_s") * 2:  # alternated, so neither always goes first
            known = filehash.known
            if mode == "readback_save_s":  # as before hashing while writing: the manifest reads every file back
                filehash.known = lambda path: None
            barrier(dist)
            t0 = time.perf_counter()
            folder = checkpoint.save(run_dir, checkpoint.TrainState(step=1), engine, dist,
                                     config_yaml=dump_yaml(Config()), keep_last=1)
            t1 = time.perf_counter()
            filehash.known = known
            checkpoint.verify(folder, dist)
            barrier(dist)
            times[mode].append(t1 - t0)
            times["verify_s"].append(time.perf_counter() - t1)
        mine = sum(p.stat().st_size for p in folder.glob(f"__{dist.rank}_*.distcp"))
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rows.append({"size": name, "params": sum(p.numel() for p in model.parameters()), "bytes": total,
                     "rank_bytes": mine, **{k: statistics.median(v) for k, v in times.items()}})
        del engine, model
    if dist.rank == 0:
        Path(f"{out}.json").write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")


def measure_loop(strategy: str, mode: str, args, tmp: Path) -> dict:
    path = tmp / f"{args.config}.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(recipe(tmp / "runs", args.config, args.steps, args.nproc)))
        subprocess.run([sys.executable, "-m", "bigtrain", "prepare", str(path)], check=True, cwd=REPO, capture_output=True)
    out = tmp / f"{strategy}-{mode}"
    torchrun(args.nproc, "--loop", str(path), str(out), f"run.name={strategy}-{mode}", *STRATEGIES[strategy],
             f"checkpoint.every={args.every}", "checkpoint.keep_last=2", *MODES[mode])
    return json.loads(Path(f"{out}.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="100m", choices=list(CONFIGS))
    p.add_argument("--strategies", nargs="*", default=["ddp", "fsdp"], choices=list(STRATEGIES),
                   help="strategies for the stall measurement (none: only the save + verify sizes)")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--sizes", nargs="*", default=["debug", "50m", "100m"], choices=list(CONFIGS))
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.strategies:
            print(f"\nstall: {args.config}, {args.nproc} ranks, {args.steps} steps, a checkpoint every {args.every} "
                  f"(the final one not counted)")
            print("| strategy | mode | stall / checkpoint s (each) | durable after s | median step s | loop cost / checkpoint s |")
            print("| --- | --- | --- | --- | --- | --- |")
        for strategy in args.strategies:
            runs = {mode: measure_loop(strategy, mode, args, tmp) for mode in MODES}
            base = sum(runs["none"]["step_time_s"])
            for mode in ("sync", "async"):
                periodic = [s for s in runs[mode]["saves"] if s["step"] < args.steps]  # the final save: in every run
                cost = sum(runs[mode]["step_time_s"]) + sum(s["stall_s"] for s in periodic) - base
                each = ", ".join(f"{s['stall_s']:.2f}" for s in periodic)
                print(f"| {strategy} | {mode} | {statistics.median(s['stall_s'] for s in periodic):.2f} ({each}) | "
                      f"{statistics.median(s['durable_s'] for s in periodic):.2f} | "
                      f"{statistics.median(runs[mode]['step_time_s']):.2f} | {cost / len(periodic):.2f} |")
            print(f"| {strategy} | none | — | — | {statistics.median(runs['none']['step_time_s']):.2f} | — |")
        if args.sizes:
            out = tmp / "sizes"
            torchrun(args.nproc, "--sizes", str(out), *args.sizes)
            rows = json.loads(Path(f"{out}.json").read_text())
            print(f"\nsave + verify, fsdp on {args.nproc} ranks (synchronous save: a preemption's; median of 2 each, "
                  f"hashed while written vs read back after writing)")
            print("| config | parameters | checkpoint MB | per rank MB | save s | save s, read back | verify s | "
                  "save MB/s per rank |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in rows:
                print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:,.0f} | {r['rank_bytes'] / 1e6:,.0f} | "
                      f"{r['save_s']:.2f} | {r['readback_save_s']:.2f} | {r['verify_s']:.2f} | "
                      f"{r['rank_bytes'] / 1e6 / r['save_s']:,.0f} |")
            xs, ys = [r["rank_bytes"] / 1e9 for r in rows], [r["save_s"] for r in rows]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fixed = my - slope * mx
            bytes_per_param = rows[-1]["bytes"] / rows[-1]["params"]
            print(f"\nfit: save_s = {fixed:.2f} + {slope:.2f} s/GB per rank (measured {1 / slope:.2f} GB/s per rank); "
                  f"{bytes_per_param:.1f} checkpoint bytes per parameter (fp32 weights + Adam moments)")
            print(json.dumps({"fixed_s": fixed, "s_per_gb": slope, "bytes_per_param": bytes_per_param}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loop":
        loop_worker(sys.argv[2], sys.argv[4:], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--sizes":
        sizes_worker(sys.argv[3:], sys.argv[2])
    else:
        main()
