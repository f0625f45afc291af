"""Resumable data order: which samples each rank reads for each optimizer step.

Global sample position p (0, 1, 2, … over the whole run) maps to sample
`perm(seed, epoch)(p % N)` with `epoch = p // N`. A global batch is the next
`global_batch_size` positions; rank r reads its contiguous slice of it, split into
micro-batches. The order depends on (seed, epoch, position) only — never on the world size
or micro-batch size — so the resume state is one integer (samples consumed), resume is
O(1), and a run may resume on a different number of ranks.

The epoch's permutation is never materialised: `IndexPermutation` computes the sample at any
position on demand (a keyed Feistel network with cycle walking), so a rank's sampler holds a few
integers whatever N is (an int64 permutation of 10⁹ samples would be 8 GB per rank per epoch), and
fetching a batch costs the same at any position.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6  # Feistel rounds: 4 make a pseudo-random permutation from a good round function; 2 more of margin


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A pseudo-random permutation of range(n), keyed by (seed, epoch), evaluated at any indices.

    A balanced Feistel network on 2·h bits (the smallest 4**h >= n) is a bijection of range(4**h); an
    index it maps to n or beyond is mapped again until it lands below n (cycle walking), which keeps it a
    bijection of range(n). Fewer than 4 tries per index on average; memory: the round keys."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.epoch = epoch
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, dtype=np.uint64)

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The samples at `positions` (each in range(n)), int64."""
        out = self._rounds(np.asarray(positions, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._rounds(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class GlobalSampler:
    """Order is a function of (seed, epoch, global sample position) only; resume state = samples consumed."""

    def __init__(
        self, num_samples: int, *, seed: int, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
        ordered: bool = False,
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
        self.ordered = ordered  # the dataset orders its samples by global position itself (a mixture): no permutation
        self._perm_cache: IndexPermutation | None = None  # the last epoch's (batches rarely span two)

    def epoch(self, consumed: int) -> int:
        return consumed // self.num_samples

    def global_indices(self, consumed: int) -> np.ndarray:
        """Sample indices of the global batch that starts at global position `consumed`. (global_batch_size,)"""
        positions = np.arange(consumed, consumed + self.global_batch_size)
        if self.ordered:
            return positions
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch may span several epochs (tiny datasets)
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))(offsets[mask])
        return out

    def rank_micro_batches(self, consumed: int) -> list[np.ndarray]:
        """This rank's contiguous slice of the global batch, as micro-batches of micro_batch_size."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_indices(consumed)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return np.split(mine, per_rank // self.micro_batch_size)

    def _perm(self, epoch: int) -> IndexPermutation:
        if self._perm_cache is None or self._perm_cache.epoch != epoch:
            self._perm_cache = IndexPermutation(self.num_samples, self.seed, epoch)
        return self._perm_cache


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
