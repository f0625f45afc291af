"""A training job: `run` takes it from start to exit, `build` makes its pieces in order (data, task, model,
optimizer, engine), `loop` trains (given a `context`; its `batches`, step `accounting` and `evaluate` beside it),
with the optimizer schedule, preemption and the hang watchdog. The top layer below the CLI: imports any layer
below, none imports it (but `preempt`'s exit codes, which the launcher reads)."""
