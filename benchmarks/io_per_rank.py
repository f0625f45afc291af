"""Bytes each rank reads from a checkpoint folder while it starts from it: `model.init_from` (verify the files it
reads, open the reader, load the weights into the engine) and a resume (`checkpoint.resume`: verify, load the
state), per strategy: single, ddp×2, fsdp×2, ZeRO-3×2, on strategies.py's `100m` config (vocab 512 by default, so
~85M parameters).

Per strategy: a base run of 1 step saves a checkpoint; then, each after evicting the checkpoint's files from the
page cache (posix_fadvise DONTNEED), a 1-step run with model.init_from=<base run> and the base run resumed for a
second step. In every process of those, the phase's deltas of /proc/self/io are recorded: `read_bytes` (what came
from the disk: page faults of memory-mapped files included, but a page another rank of this host read first is in
the page cache, so it counts once per host) and `rchar` (bytes through read() calls, from the cache or not; mmap
faults not counted). Both are whole-process counters, so the phases are measured narrowly (around
verify_init_checkpoint, load_init_weights and the engine's load_model_weights; around checkpoint.resume).

    python benchmarks/io_per_rank.py [--config 100m] [--vocab 512] [--strategies single ddp fsdp zero3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from strategies import CONFIGS, REPO, recipe

STRATEGIES = {
    "single": (1, ["parallel.strategy=single"]),
    "ddp": (2, ["parallel.strategy=ddp"]),
    "fsdp": (2, ["parallel.strategy=fsdp"]),
    "zero3": (2, ["parallel.strategy=deepspeed", "parallel.zero_stage=3"]),
    "zero2": (2, ["parallel.strategy=deepspeed", "parallel.zero_stage=2"]),
}


def proc_io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read_bytes": int(fields["read_bytes"]), "rchar": int(fields["rchar"])}


def measure_worker(out: str, argv: list[str]) -> None:
    """(In each process of a measured run.) `bigtrain ARGV`, with the init_from and resume phases' /proc/self/io
    deltas appended to `out` (one JSON line per rank and phase)."""
    import bigtrain.parallel.deepspeed  # noqa: F401 — imported before the phases, so that reading their
    import bigtrain.parallel.fsdp  # noqa: F401 — source files (torch.distributed's: ~20 MB) is not counted
    import bigtrain.parallel.local  # noqa: F401
    from bigtrain import checkpoint
    from bigtrain.train import build
    from bigtrain.cli import main

    totals = {"init_from": {"read_bytes": 0, "rchar": 0, "s": 0.0}, "resume": {"read_bytes": 0, "rchar": 0, "s": 0.0}}

    def counted(phase: str, fn):
        def wrapper(*args, **kwargs):
            before, t0 = proc_io(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                after = proc_io()
                for key in ("read_bytes", "rchar"):
                    totals[phase][key] += after[key] - before[key]
                totals[phase]["s"] += time.perf_counter() - t0
        return wrapper

    # resolving init_from lists folders (it used to verify the whole checkpoint too)
    checkpoint.resolve_init_checkpoint = counted("init_from", checkpoint.resolve_init_checkpoint)
    if hasattr(checkpoint, "verify_init_checkpoint"):
        checkpoint.verify_init_checkpoint = counted("init_from", checkpoint.verify_init_checkpoint)
    checkpoint.load_init_weights = counted("init_from", checkpoint.load_init_weights)
    checkpoint.resume = counted("resume", checkpoint.resume)
    build_engine = build.build_engine

    def build_counted_engine(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        engine.load_model_weights = counted("init_from", engine.load_model_weights)
        return engine

    build.build_engine = build_counted_engine
    code = main(argv)
    rank = int(os.environ.get("RANK", "0"))
    with open(out, "a") as f:
        for phase, counts in totals.items():
            f.write(json.dumps({"rank": rank, "phase": phase, **counts}) + "\n")
    sys.exit(code)


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (they are on disk: checkpoints are fsynced)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def launch(nproc: int, argv: list[str], measure_out: Path | None = None) -> None:
    """`bigtrain ARGV` on `nproc` processes (torchrun for several), measured by measure_worker when `measure_out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    entry = [str(Path(__file__).resolve()), "--measure", str(measure_out), "--"] if measure_out else ["-m", "bigtrain"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, *entry, *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-4000:]}")


def manifest_bytes(folder: Path) -> tuple[int, dict[str, int]]:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return sum(e["bytes"] for e in files.values()), {name: e["bytes"] for name, e in files.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="100m", choices=list(CONFIGS))
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp", "zero3"], choices=list(STRATEGIES))
    p.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure_worker(args.measure, args.argv)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="bigtrain-io-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.strategies:
        nproc, strategy = STRATEGIES[name]
        spec = recipe(work / "runs", args.config, steps=1, nproc=nproc)
        spec["data"]["vocab_size"] = args.vocab
        spec["data"]["cache_dir"] = str(work / "cache")
        spec["checkpoint"] = {"every": 1, "keep_last": 1, "resume": "auto", "async_save": False}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        base = work / "runs" / f"base-{name}"
        launch(nproc, ["train", str(path), f"run.name=base-{name}", *strategy])
        folder = sorted((base / "checkpoints").glob("step-*"))[-1]
        total, files = manifest_bytes(folder)
        weights = sum(size for n, size in files.items() if n == "model.pt") or None
        measured = {}
        for phase, extra in (("init_from", [f"run.name=init-{name}", f"model.init_from={base}", "checkpoint.every=0"]),
                             ("resume", [f"run.name=base-{name}", "train.max_steps=2", "checkpoint.every=0"])):
            out = work / f"{name}-{phase}.jsonl"
            out.unlink(missing_ok=True)
            evict(folder)
            launch(nproc, ["train", str(path), *strategy, *extra], measure_out=out)
            measured[phase] = sorted((r for r in map(json.loads, out.read_text().splitlines()) if r["phase"] == phase),
                                     key=lambda r: r["rank"])
        rows.append({"strategy": name, "nproc": nproc, "checkpoint_bytes": total, "model_pt_bytes": weights,
                     "files": files, **measured})
        print(json.dumps(rows[-1]), flush=True)
    (work / "io_per_rank.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {work / 'io_per_rank.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
