"""Resumable data order: which samples each rank reads for each optimizer step.

Global sample position p (0, 1, 2, … over the whole run) maps to sample
`perm(seed, epoch)[p % N]` with `epoch = p // N`. A global batch is the next
`global_batch_size` positions; rank r reads its contiguous slice of it, split into
micro-batches. The order depends on (seed, epoch, position) only — never on the world size
or micro-batch size — so the resume state is one integer (samples consumed), resume is
O(1), and a run may resume on a different number of ranks.
"""

from __future__ import annotations

import numpy as np

_CACHED_EPOCHS = 2


class GlobalSampler:
    """Order is a function of (seed, epoch, global sample position) only; resume state = samples consumed."""

    def __init__(
        self, num_samples: int, *, seed: int, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} "
                f"× world_size {world_size}"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation, the last few only

    def epoch(self, consumed: int) -> int:
        return consumed // self.num_samples

    def global_indices(self, consumed: int) -> np.ndarray:
        """Sample indices of the global batch that starts at global position `consumed`. (global_batch_size,)"""
        positions = np.arange(consumed, consumed + self.global_batch_size)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch may span several epochs (tiny datasets)
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[offsets[mask]]
        return out

    def rank_micro_batches(self, consumed: int) -> list[np.ndarray]:
        """This rank's contiguous slice of the global batch, as micro-batches of micro_batch_size."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_indices(consumed)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return np.split(mine, per_rank // self.micro_batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= _CACHED_EPOCHS:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]


def eval_indices(num_samples: int, rank: int, world_size: int, limit: int | None = None) -> np.ndarray:
    """This rank's contiguous chunk of the first `limit` samples (default all); no padding, no repeats.

    Ranks may get different counts (they differ by at most one), so eval must sum losses and
    token counts across ranks rather than average per-rank means.
    """
    return np.array_split(np.arange(_eval_total(num_samples, limit), dtype=np.int64), world_size)[rank]


def eval_busiest_count(num_samples: int, world_size: int, limit: int | None = None) -> int:
    """Samples in the largest rank's `eval_indices` chunk: a sharded model's forward is collective, so every
    rank runs as many eval forwards as that rank needs."""
    return -(-_eval_total(num_samples, limit) // world_size)


def _eval_total(num_samples: int, limit: int | None) -> int:
    return num_samples if limit is None else min(limit, num_samples)
