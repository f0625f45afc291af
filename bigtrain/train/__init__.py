"""A training job: `run` builds it in order (data, model, engine, checkpoint, metrics), `loop` trains, with the
optimizer schedule, preemption and the hang watchdog. The top layer below the CLI: imports any layer below,
none imports it (but `preempt`'s exit codes, which the launcher reads)."""
