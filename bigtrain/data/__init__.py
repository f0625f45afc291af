"""Data layer: documents (Hugging Face datasets) → tokenizer → packed token shards → resumable order.

    data = prepare_data(cfg.data, task=cfg.task.name)    # once (`bigtrain prepare`); cached, idempotent
    data = load_prepared(cfg.data, task=cfg.task.name)   # every rank: memmap + verify checksums
    sampler = GlobalSampler(len(data.train), seed=..., global_batch_size=..., micro_batch_size=...,
                            rank=..., world_size=...)
    for micro in sampler.rank_micro_batches(consumed): batch = [data.train[i] for i in micro]

A sample is an int64 token array (causal_lm, masked_lm) or a dict (classification: tokens,
label; sft: tokens, loss_mask, segments) — see `dataset.py`.

Importing this package is cheap: `datasets` and `tokenizers` load only when used.
"""

from bigtrain.data.prepare import PreparedData, data_cache_path, load_prepared, prepare_data
from bigtrain.data.sampler import GlobalSampler, eval_busiest_count, eval_indices
from bigtrain.data.dataset import TokenDataset

__all__ = [
    "GlobalSampler",
    "PreparedData",
    "TokenDataset",
    "data_cache_path",
    "eval_busiest_count",
    "eval_indices",
    "load_prepared",
    "prepare_data",
]
