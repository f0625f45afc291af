"""`bigtrain` CLI that counts, per training step, the places in bigtrain's own code that would make the host wait
for the device on a GPU: a tensor read on the host (`item`, `tolist`, `bool`, `float`, `int`, `index`, formatting,
`cpu()`), called from a bigtrain source file on the training thread.

    BIGTRAIN_COUNT_SYNCS=1 torchrun … tests/integration/count_syncs.py train RECIPE [overrides]

Each rank writes RUN_DIR/syncs-rank-N.json: {step: reads during that step}, a step running from the loop's
`start_step(step)` to the next one (its log, eval and checkpoint included). Reads inside torch itself are not
counted (e.g. the non-capturable optimizers' step counts, CPU tensors by design), nor reads on other threads.
On a CPU every tensor is a host tensor, so the count is of the places, which is what would sync on a GPU; host
numbers read through numpy (`all_reduce_host`) are not such a place.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from pathlib import Path

import torch

import bigtrain
import bigtrain.train.watchdog
from bigtrain.cli import main

BIGTRAIN_DIR = str(Path(bigtrain.__file__).resolve().parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "cpu")


def install(counts: dict[int, int]) -> None:
    current = {"step": 0}
    main_thread = threading.main_thread()

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if threading.current_thread() is main_thread and sys._getframe(1).f_code.co_filename.startswith(BIGTRAIN_DIR):
                counts[current["step"]] = counts.get(current["step"], 0) + 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    start_step = bigtrain.train.watchdog.Progress.start_step

    def start_step_counted(self, step: int) -> None:
        current["step"] = step
        return start_step(self, step)

    bigtrain.train.watchdog.Progress.start_step = start_step_counted


def write(counts: dict[int, int], argv: list[str]) -> None:
    """RUN_DIR/syncs-rank-N.json, the run dir from the recipe and its overrides, as `bigtrain train` makes it."""
    from bigtrain.config import load_config

    cfg = load_config(argv[1], argv[2:], world_size=int(os.environ.get("WORLD_SIZE", "1")))
    path = cfg.run_dir() / f"syncs-rank-{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps({str(k): v for k, v in sorted(counts.items())}))


if __name__ == "__main__":
    counts: dict[int, int] = {}
    if os.environ.get("BIGTRAIN_COUNT_SYNCS"):
        install(counts)
        atexit.register(write, counts, sys.argv[1:])
    raise SystemExit(main())
