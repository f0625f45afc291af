"""A recipe's model checked before anything is built (`bigtrain check`, `bigtrain launch`, a run's start): its spec
resolved (an HF init_from's config.json included) and checked against the data and task settings. No torch."""

from __future__ import annotations

from bigtrain.config import Config
from bigtrain.core.errors import UserError
from bigtrain.models import resolve_model_spec
from bigtrain.models.presets import ModelSpec


def check_model(cfg: Config, num_labels: int = 2) -> ModelSpec | None:
    """Resolve the recipe's model spec and check it against the data and task settings (no weights, no torch).
    Classification specs carry num_labels (the real count is known once the data is prepared). With a
    Hugging Face folder or hub id as model.init_from, the model keys come from its config.json
    (bigtrain/interop); None when that is a hub id not in the local cache (nothing to check yet: the run
    downloads it and checks then)."""
    if cfg.model.init_from:
        from bigtrain.interop.hf_config import with_hf_model  # torch-free; unchanged unless an HF folder
        from bigtrain.interop.hub import is_hub_id, local_folder

        m, init_from = cfg.model, cfg.model.init_from
        if is_hub_id(init_from) and local_folder(init_from, m.init_revision, download=False) is None:
            return None
        cfg = with_hf_model(cfg, download=False)
    classify = cfg.task.data_task == "classification"
    spec = resolve_model_spec(cfg.model, cfg.model.vocab_size, head="classify" if classify else "lm",
                              num_labels=num_labels if classify else None, pooling=cfg.task.pooling)
    if cfg.data.seq_len > spec.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={spec.max_seq_len} "
                        f"(set model.max_seq_len or lower data.seq_len)")
    needs = {"causal_lm": "decoder", "sft": "decoder", "masked_lm": "encoder"}.get(cfg.task.data_task)
    if needs and spec.arch != needs:
        raise UserError(f"task.name={cfg.task.name} needs model.arch: {needs}, got '{spec.arch}'")
    return spec
