"""Checkpoints on disk: the store (layout, publish, retention), the manifest and its verification, resume, weights
out of a checkpoint (init_from, a LoRA run's base), the run-dir lease, and export. Imports core, config, models,
interop and parallel (whose engines write and read the tensors); never plan, eval, train or the CLI.
This module gathers the names the layers above use: `from bigtrain import checkpoint; checkpoint.save(...)`."""

from bigtrain.checkpoint.manifest import MANIFEST, CheckpointError, hash_files, verify
from bigtrain.checkpoint.resume import find_resume_checkpoint, resume
from bigtrain.checkpoint.store import (BASE_FILE, TRAINER, Checkpointer, TrainState, VerifiedCheckpoints,
                                       checkpoints_dir, list_checkpoints, prune, save, step_dir)
from bigtrain.checkpoint.weights import (INIT_READS, BaseOverlay, LazyWeights, base_reference, check_base, load_base,
                                         load_init_weights, open_init_reader, open_weights, resolve_init_checkpoint,
                                         verify_init_checkpoint, with_base)

__all__ = [
    "BASE_FILE", "INIT_READS", "MANIFEST", "TRAINER", "BaseOverlay", "CheckpointError", "Checkpointer", "LazyWeights",
    "TrainState", "VerifiedCheckpoints", "base_reference", "check_base", "checkpoints_dir", "find_resume_checkpoint",
    "hash_files", "list_checkpoints", "load_base", "load_init_weights", "open_init_reader", "open_weights", "prune",
    "resolve_init_checkpoint", "resume", "save", "step_dir", "verify", "verify_init_checkpoint", "with_base",
]
