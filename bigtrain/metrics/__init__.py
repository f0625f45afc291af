"""Training telemetry, one job per module; every name below is importable from ``bigtrain.metrics``.

- ``sinks``: ``MetricsLogger`` — metrics.jsonl, wandb (lazy import) and the console, on rank 0 only.
- ``progress``: the console progress bar / plain progress lines the logger drives.
- ``throughput``: ``StepTimer``, ``mfu``, ``PeakMemory``.
- ``plots``: loss curves from metrics.jsonl (``RUN/curves.png``, ``bigtrain plot``); matplotlib only there.

Metric keys the training loop logs (``metrics.jsonl`` lines are ``{"step": N, **metrics}``):

    train/loss           mean loss per target token over the optimizer step
    train/lr             learning rate of the first parameter group
    train/grad_norm      global gradient norm before clipping
    train/skipped_steps  optimizer steps skipped so far (non-finite gradients)
    perf/tokens_per_sec  tokens processed per second, all ranks together
    perf/mfu             model FLOPs utilisation, a fraction of the peak (0.42 = 42 %)
    perf/step_time_s     mean wall time of one optimizer step
    perf/data_wait_frac  fraction of step time spent waiting for the next batch
    perf/max_memory_gb   rank 0's peak memory since the model was built (see ``PeakMemory``)
    eval/loss            mean loss per target token on the eval set
    eval/ppl             exp(eval/loss)
"""

from bigtrain.metrics.sinks import METRICS_FILE, MetricsLogger
from bigtrain.metrics.throughput import PeakMemory, StepTimer, mfu

__all__ = ["METRICS_FILE", "MetricsLogger", "PeakMemory", "StepTimer", "mfu"]
