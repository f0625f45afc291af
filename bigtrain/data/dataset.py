"""The samples of one prepared split, per task, read from the memmapped cache (`TokenDataset`).

| task | sample i |
| --- | --- |
| causal_lm, masked_lm | int64 (seq_len + 1,): a window of the stream (packing), or one document cut to that |
| classification | {"tokens": int64 (L,), "label": int}: example i, L ≤ seq_len (never packed) |
| sft | {"tokens": int64 (L,), "loss_mask": bool (L,), "segments": int32 (L,)}, L ≤ seq_len + 1 |

SFT: `loss_mask` is True on the tokens to predict (response tokens and the EOS); the task
shifts it with the tokens (targets = tokens[1:], mask = loss_mask[1:]). `segments` numbers
the examples inside a sample 0, 1, 2, …; a target whose segment differs from its input's is
the first token of the next example and is never predicted. With packing, whole examples
are packed greedily in order while they fit in seq_len + 1 tokens (the task's collate pads
the rest); without, one example per sample. An example longer than seq_len + 1 tokens keeps
the tail of its prompt (the tokens before its first loss token) — at most half the room
when the response needs more — and then as much of the response as fits. Examples of fewer
than 2 tokens (nothing to predict from) are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigtrain.core import safe_load
from bigtrain.data.examples import LABELS_FILE, LOSS_SPANS_FILE
from bigtrain.data.shards import DOC_OFFSETS

LM_TASKS = ("causal_lm", "masked_lm")


class TokenDataset:
    """One split of prepared tokens, memmapped; `task` decides what a sample is (see the module docstring).

    causal_lm/masked_lm, packing=True: sample i is the window tokens[i*seq_len : i*seq_len +
    seq_len + 1] of the split's token stream (inputs are [:-1], targets [1:]; consecutive
    windows share one token), so there are (num_tokens - 1) // seq_len samples. A window may
    cross shards. packing=False: sample i is the i-th document with at least 2 tokens (EOS
    included), truncated to seq_len + 1 tokens; the task's collate pads.
    """

    def __init__(self, folder: Path, info: dict, dtype: np.dtype, *, seq_len: int, packing: bool, task: str = "causal_lm"):
        self.folder = folder
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.packing = packing
        self.task = task
        self.num_tokens: int = info["num_tokens"]
        self.num_docs: int = info["num_docs"]
        self._files = [safe_load.inside(folder, shard["file"], where=folder.parent / "index.json")
                       for shard in info["shards"]]
        self._shard_starts = np.cumsum([0] + [shard["num_tokens"] for shard in info["shards"]])
        self._shards: list[np.memmap] | None = None  # opened on first read, never pickled
        self._arrays: dict[str, np.ndarray] = {}  # per-task .npy files, memmapped on first read, never pickled
        if task in LM_TASKS and packing:
            self._num_samples = max(0, (self.num_tokens - 1) // seq_len)
            return
        offsets = safe_load.load_npy(folder / DOC_OFFSETS)  # memory-mapped: read as needed, not held whole
        starts, ends = offsets[:-1], offsets[1:]
        if task == "classification":  # examples were cut to seq_len when prepared
            self._doc_starts, self._doc_ends = starts, ends
            self._num_samples = self.num_docs
        elif task == "sft":
            self._init_sft(starts, ends)
        else:
            keep = ends - starts >= 2
            self._doc_starts = starts[keep]
            self._doc_ends = np.minimum(ends[keep], self._doc_starts + seq_len + 1)
            self._num_samples = int(keep.sum())

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, i: int) -> np.ndarray | dict:
        i = int(i)
        if not 0 <= i < self._num_samples:
            raise IndexError(f"sample {i} out of range for {self._num_samples} samples")
        if self.task == "sft":
            return self._sft_sample(i)
        if self.task in LM_TASKS and self.packing:
            start = i * self.seq_len
            return self.read(start, start + self.seq_len + 1)  # (seq_len + 1,)
        tokens = self.read(int(self._doc_starts[i]), int(self._doc_ends[i]))
        if self.task == "classification":
            return {"tokens": tokens, "label": int(self._array(LABELS_FILE)[i])}
        return tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the split's stream as int64, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        shards = self._open()
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_start, shard_stop = self._shard_starts[k], self._shard_starts[k + 1]
            take = min(stop, shard_stop) - pos
            out[pos - start : pos - start + take] = shards[k][pos - shard_start : pos - shard_start + take]
            pos += take
            k += 1
        return out

    # ----------------------------------------------------------------------- sft

    def _init_sft(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Each example's kept window [start, stop) and its loss spans; then the packing groups."""
        span_starts = safe_load.load_npy(self.folder / LOSS_SPANS_FILE, mmap=False)[:, 0]  # (S,) sorted; only while building
        first_span = np.searchsorted(span_starts, starts)  # (N,) each example's first span
        last_span = np.searchsorted(span_starts, ends)  # (N,) one past its last
        prompt_lens = span_starts[np.minimum(first_span, len(span_starts) - 1)] - starts if len(starts) else starts
        window_starts, window_stops = sft_windows(starts, ends, prompt_lens, self.seq_len + 1)
        keep = ends - starts >= 2
        self._window_starts, self._window_stops = window_starts[keep], window_stops[keep]
        self._first_span, self._last_span = first_span[keep], last_span[keep]
        lengths = self._window_stops - self._window_starts
        if self.packing:
            self._groups = pack_greedy(lengths, self.seq_len + 1)
        else:
            self._groups = np.arange(len(lengths) + 1, dtype=np.int64)
        self._num_samples = len(self._groups) - 1

    def _sft_sample(self, i: int) -> dict:
        spans = self._array(LOSS_SPANS_FILE)
        tokens, masks, segments = [], [], []
        for segment, k in enumerate(range(self._groups[i], self._groups[i + 1])):
            start, stop = int(self._window_starts[k]), int(self._window_stops[k])
            mask = np.zeros(stop - start, dtype=bool)
            for span_start, span_stop in spans[self._first_span[k] : self._last_span[k]]:
                mask[max(span_start, start) - start : max(min(span_stop, stop) - start, 0)] = True
            tokens.append(self.read(start, stop))
            masks.append(mask)
            segments.append(np.full(stop - start, segment, dtype=np.int32))
        return {"tokens": np.concatenate(tokens), "loss_mask": np.concatenate(masks), "segments": np.concatenate(segments)}

    # ----------------------------------------------------------------------- files

    def _open(self) -> list[np.memmap]:
        if self._shards is None:
            sizes = np.diff(self._shard_starts)
            self._shards = [np.memmap(f, dtype=self.dtype, mode="r", shape=(int(n),)) for f, n in zip(self._files, sizes)]
        return self._shards

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = safe_load.load_npy(self.folder / name)
        return self._arrays[name]

    def __getstate__(self) -> dict:
        # DataLoader workers reopen the memmaps instead of receiving a copy of the data.
        return {**self.__dict__, "_shards": None, "_arrays": {}}

    def __repr__(self) -> str:
        mode = "packed" if self.packing and self.task != "classification" else "one per sample"
        return f"TokenDataset({self.folder}, {self.task}, {len(self)} samples, {self.num_tokens} tokens, {mode})"


def sft_windows(starts: np.ndarray, ends: np.ndarray, prompt_lens: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of each example after cutting it to `room` tokens.

    An example that fits is whole. A longer one keeps min(prompt, max(room - response, room // 2))
    tokens of its prompt's tail, then fills the rest with the head of its response.
    """
    prompt_stops = starts + prompt_lens
    responses = ends - prompt_stops
    too_long = ends - starts > room
    keep_prompt = np.where(too_long, np.minimum(prompt_lens, np.maximum(room - responses, room // 2)), prompt_lens)
    stops = np.where(too_long, prompt_stops + room - keep_prompt, ends)
    return prompt_stops - keep_prompt, stops


def pack_greedy(lengths: np.ndarray, room: int) -> np.ndarray:
    """Group boundaries (G + 1,) packing consecutive items greedily while their lengths sum to ≤ room.

    Every length is ≤ room. Group g is items [bounds[g], bounds[g + 1]). Cost: O(G log N).
    """
    cum = np.concatenate([[0], np.cumsum(lengths)])
    bounds = [0]
    while bounds[-1] < len(lengths):
        i = bounds[-1]
        j = int(np.searchsorted(cum, cum[i] + room, side="right")) - 1  # last j with cum[j] - cum[i] <= room
        bounds.append(max(j, i + 1))
    return np.array(bounds, dtype=np.int64)
