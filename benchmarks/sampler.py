"""The data order's cost per rank: memory held and time to fetch a global batch, at any position.

bigtrain's GlobalSampler computes each position's sample on demand (an index-addressable permutation:
bigtrain/data/sampler.py), against the materialised per-epoch permutation it used before
(`np.random.default_rng([seed, epoch]).permutation(n)`, int64: 8 bytes per sample per rank).

    python benchmarks/sampler.py [--samples 1e9] [--global-batch 512] [--materialised 1e8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bigtrain.data import GlobalSampler  # noqa: E402


def fetch_ms(sampler: GlobalSampler, position: int, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sampler.global_indices(position)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=float, default=1e9)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--materialised", type=float, default=1e8, help="samples for the old materialised permutation")
    args = p.parse_args()
    n, gbs = int(args.samples), args.global_batch
    tracemalloc.start()
    sampler = GlobalSampler(n, seed=0, global_batch_size=gbs, micro_batch_size=gbs, rank=0, world_size=1)
    positions = {"start": 0, "middle": n // 2, "end of epoch": n - gbs, "epoch 7": 7 * n + 12_345}
    times = {name: fetch_ms(sampler, pos) for name, pos in positions.items()}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"on-demand permutation, {n:,} samples, global batch {gbs}: Python-heap peak {peak / 2**20:.2f} MB; "
          "fetch ms (median of 20): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    m = int(args.materialised)
    t0 = time.perf_counter()
    perm = np.random.default_rng([0, 0]).permutation(m)
    made = time.perf_counter() - t0
    print(f"materialised permutation (before), {m:,} samples: {perm.nbytes / 2**20:,.0f} MB per rank and epoch, "
          f"{made:.2f} s to make at each epoch start; at {n:,} samples: {8 * n / 2**30:,.1f} GiB, "
          f"~{made * n / m:.0f} s")


if __name__ == "__main__":
    main()
