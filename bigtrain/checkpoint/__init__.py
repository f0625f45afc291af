"""Checkpoints on disk: the store (layout, publish, manifest, verification, retention, resume choice), the run-dir
lease, and export out of a run. Imports core, config, data, models, interop and parallel (whose engines write and
read the tensors); never train, eval or the CLI."""
