"""Weighted mixtures of sources (`data.mixture`): each source prepared into its own cache, one sample order.

The order is a function of (seed, global sample position) only, like a single source's (sampler.py),
so it does not depend on the world size, resume is O(1) and a run resumes on another number of ranks:

- Positions come in blocks of `BLOCK` (1,000). Source s holds `n_s` places in every block (its weight
  × 1,000, rounded so they sum to 1,000), spread evenly (place j of source s sits at (j + ½) / n_s of the
  block). The pattern is the same in every block, so any 1,000 consecutive positions hold exactly n_s
  samples of source s: its share is within 0.05 points of its weight.
- Position p of block b at place j of source s is that source's draw number k = b · n_s + j. Source s
  reads its samples in its own order: sample `perm(seed_s, e)(k mod N_s)` of epoch e = k // N_s
  (`IndexPermutation`, keyed per source).
- `mixture_exhaust: repeat`: each source starts over, in a new order, when it runs out (a small source
  is seen more often than once per pass over a large one). `stop`: the mixture's epoch ends with the
  first source to run out (whole blocks, L positions); epoch E of the mixture reads epoch E of every
  source, each sample at most once.

Validation is every source's validation split, taken in turn (`InterleavedSamples`): eval.max_samples scores
every source alike, and eval logs each source's loss.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from bigtrain.data.sampler import IndexPermutation
from bigtrain.core.errors import UserError

if TYPE_CHECKING:
    from bigtrain.config import DataConfig

BLOCK = 1000


@dataclasses.dataclass(frozen=True)
class MixturePart:
    name: str
    weight: float
    cfg: DataConfig  # the DataConfig this source is prepared with


def mixture_parts(cfg) -> list[MixturePart]:
    """data.mixture's sources as full data configs (an entry's unset keys from the data section's)."""
    parts = []
    for i, entry in enumerate(cfg.mixture):
        inherit = lambda key: getattr(entry, key) if getattr(entry, key) is not None else getattr(cfg, key)  # noqa: E731
        part = dataclasses.replace(
            cfg, mixture=(), source=entry.source, subset=entry.subset, split=entry.split, revision=entry.revision,
            text_column=inherit("text_column"), max_documents=inherit("max_documents"),
            validation_split=inherit("validation_split"), tokenizer=inherit("tokenizer"))
        parts.append(MixturePart(entry.name or f"source{i + 1}", entry.weight, part))
    return parts


def block_pattern(weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each place of a block, its draw number within the block, places per source)."""
    total = sum(weights)
    exact = np.array([BLOCK * w / total for w in weights])
    counts = np.floor(exact).astype(np.int64)
    for s in np.argsort(-(exact - counts), kind="stable")[:BLOCK - counts.sum()]:  # largest remainders
        counts[s] += 1
    if (counts == 0).any():
        raise UserError(f"data.mixture: a weight below 1/{2 * BLOCK} of the total gets no place in {BLOCK} samples "
                        f"— raise it or drop that source")
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
    sources = np.concatenate([np.full(n, s) for s, n in enumerate(counts)])
    draws = np.concatenate([np.arange(n) for n in counts])
    order = np.lexsort((sources, keys))
    return sources[order], draws[order], counts


class MixtureDataset:
    """The training samples of a mixture, by global position (see the module docstring). `ordered`: the
    sampler reads positions in order; the order within each source is this class's."""

    ordered = True

    def __init__(self, names: list[str], datasets: list, weights: list[float], *, seed: int, exhaust: str):
        self.names, self.datasets, self.seed, self.exhaust = names, datasets, seed, exhaust
        self.sizes = [len(d) for d in datasets]
        for name, size in zip(names, self.sizes):
            if size == 0:
                raise UserError(f"data.mixture: source {name} has no training samples")
        self.sources, self.draws, self.counts = block_pattern(weights)
        before = np.zeros((BLOCK + 1, len(datasets)), dtype=np.int64)  # places of each source before place j
        before[np.arange(1, BLOCK + 1), self.sources] = 1
        self._before = np.cumsum(before, axis=0)
        # stop: whole blocks until the first source runs out
        self.epoch_len = BLOCK * min(size // n for size, n in zip(self.sizes, self.counts)) if exhaust == "stop" else None
        if self.epoch_len == 0:
            short = min(range(len(names)), key=lambda s: self.sizes[s] / self.counts[s])
            raise UserError(f"data.mixture: source {names[short]} has {self.sizes[short]} training samples, fewer than "
                            f"its {self.counts[short]} per {BLOCK} — with mixture_exhaust=stop the mixture would have "
                            f"no epoch; use repeat")
        self._perms: dict[tuple[int, int], IndexPermutation] = {}

    def __len__(self) -> int:
        """Samples per epoch: stop, the mixture's epoch; repeat, one pass over the sources at their weights
        (until the source that runs out last does)."""
        if self.epoch_len is not None:
            return self.epoch_len
        return BLOCK * max(-(-size // n) for size, n in zip(self.sizes, self.counts))

    def locate(self, position: int) -> tuple[int, int]:
        """(source, its sample index) at global `position`."""
        epoch, p = divmod(position, self.epoch_len) if self.epoch_len else (0, position)
        block, place = divmod(p, BLOCK)
        s = int(self.sources[place])
        k = block * int(self.counts[s]) + int(self.draws[place])
        source_epoch, index = (epoch, k) if self.epoch_len else divmod(k, self.sizes[s])
        return s, int(self._perm(s, source_epoch)(np.array([index]))[0])

    def __getitem__(self, position: int):
        s, index = self.locate(int(position))
        return self.datasets[s][index]

    def samples_per_source(self, consumed: int) -> dict[str, int]:
        """How many of the first `consumed` positions each source filled."""
        epochs, p = divmod(consumed, self.epoch_len) if self.epoch_len else (0, consumed)
        blocks, place = divmod(p, BLOCK)
        per_epoch = (self.epoch_len // BLOCK) * self.counts if self.epoch_len else 0
        counts = epochs * per_epoch + blocks * self.counts + self._before[place]
        return {name: int(n) for name, n in zip(self.names, counts)}

    def metrics(self, consumed: int) -> dict[str, int]:
        """data/tokens/<source>: the tokens each source has given in the first `consumed` samples (packed
        samples: seq_len each; unpacked, data/samples/<source>)."""
        packed = all(getattr(d, "packing", False) for d in self.datasets)
        seq_len = getattr(self.datasets[0], "seq_len", 0)
        return {f"data/tokens/{name}" if packed else f"data/samples/{name}": n * seq_len if packed else n
                for name, n in self.samples_per_source(consumed).items()}

    def passes(self, positions: int) -> dict[str, float]:
        """Passes over each source's training samples that `positions` samples make (the run's plan, logged)."""
        share = self.samples_per_source(positions)
        return {name: share[name] / size for name, size in zip(self.names, self.sizes)}

    def _perm(self, s: int, epoch: int) -> IndexPermutation:
        key = (s, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.datasets):
                self._perms.clear()
            source_seed = int(np.random.SeedSequence([self.seed, s]).generate_state(1)[0])  # one key per source
            self._perms[key] = IndexPermutation(self.sizes[s], source_seed, epoch)
        return self._perms[key]


class InterleavedSamples:
    """A mixture's validation splits as one, taken in turn: sample 0 of every source, then sample 1 of every source,
    and so on (a source that has run out is passed over). So the first N samples, what `eval.max_samples` scores,
    hold every source alike (⌊N / sources⌋ or one more each, or all a smaller split has), deterministically and
    whatever the order of data.mixture; `positions` groups them by source, which eval scores apart
    (eval/loss/<source>)."""

    def __init__(self, names: list[str], datasets: list):
        self.names, self.datasets = names, datasets
        self.sizes = np.array([len(d) for d in datasets], dtype=np.int64)
        # Turn r takes sample r of every source with more than r samples: between two consecutive split sizes the
        # same sources take turns. Segment k covers turns [turns[k], turns[k + 1]) of the sources active[k].
        self._turns = np.unique(np.concatenate([[0], self.sizes]))
        active = [np.flatnonzero(self.sizes > turn) for turn in self._turns[:-1]]
        self._active = np.zeros((len(active), len(datasets)), dtype=np.int64)  # (segments, sources), left-aligned
        for k, sources in enumerate(active):
            self._active[k, :len(sources)] = sources
        self._width = np.array([len(sources) for sources in active], dtype=np.int64)
        self._starts = np.cumsum([0, *(np.diff(self._turns) * self._width)])  # first position of each segment

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, its sample index) of each of `positions` (an int array within range)."""
        k = np.searchsorted(self._starts, positions, side="right") - 1
        turn, place = np.divmod(positions - self._starts[k], self._width[k])
        return self._active[k, place], self._turns[k] + turn

    def __getitem__(self, position: int):
        position = int(position)
        if not 0 <= position < len(self):
            raise IndexError(f"sample {position} out of range for {len(self)} samples")
        source, index = self.locate(np.array([position]))
        return self.datasets[int(source[0])][int(index[0])]

    def positions(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """{source name: the positions of its samples among the first `limit` (default all)}, sources with none
        left out."""
        first = np.arange(len(self) if limit is None else min(limit, len(self)), dtype=np.int64)
        sources, _ = self.locate(first)
        return {name: first[sources == s] for s, name in enumerate(self.names) if (sources == s).any()}


def open_mixture(cfg, opened: list, *, seed: int):
    """The mixture's PreparedData from its sources' (in data.mixture's order): the first one's tokenizer and ids,
    train = MixtureDataset (its order keyed by `seed`, run.seed), validation = every source's, in turn."""
    parts, first = mixture_parts(cfg), opened[0]
    for part, data in zip(parts[1:], opened[1:]):
        if data.vocab_size != first.vocab_size or data.eos_id != first.eos_id:
            raise UserError(f"data.mixture: source {part.name} was prepared with another tokenizer ({data.path})")
    names = [p.name for p in parts]
    train = MixtureDataset(names, [d.train for d in opened], [p.weight for p in parts], seed=seed,
                           exhaust=cfg.mixture_exhaust)
    return dataclasses.replace(first, train=train, validation=InterleavedSamples(names, [d.validation for d in opened]))
