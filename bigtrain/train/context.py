"""What the loop is given: the built pieces of a job and the hooks run.py wires to them (LoopContext)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

from torch import nn

from bigtrain.train.preempt import PreemptionGuard
from bigtrain.train.watchdog import Progress

if TYPE_CHECKING:
    from bigtrain.checkpoint import TrainState
    from bigtrain.config import Config
    from bigtrain.data.dataset import TokenDataset
    from bigtrain.data.mixture import InterleavedSamples, MixtureDataset
    from bigtrain.metrics import MetricsLogger, PeakMemory
    from bigtrain.parallel import Dist, Engine
    from bigtrain.tasks import Task

# eval.tasks' scorer (bigtrain.eval.lm_eval.InLoopTasks): (model, forward_context) -> metrics; collective
InLoopScorer = Callable[[nn.Module, Callable[[], ContextManager]], dict[str, float]]


@dataclass
class LoopContext:
    """What the loop needs from run.py, built once in the build order run.py writes out."""

    cfg: Config
    dist: Dist
    engine: Engine
    task: Task
    train_data: TokenDataset | MixtureDataset  # indexable dataset of token arrays (a mixture orders its own samples)
    val_data: TokenDataset | InterleavedSamples
    logger: MetricsLogger | None  # None: eval only (run_eval), nothing is logged
    flops_per_token: float
    peak_flops_per_sec: float  # of one device
    raise_peak: Callable[[float], float] | None = None  # a run beat the peak (it was wrong): the corrected peak
    # save_checkpoint(state, sync=False) -> Path (async: durable by the next save)
    save_checkpoint: Callable[..., Path] | None = None
    bench: bool = False  # time forward/backward and optimizer separately; no eval, no checkpoints
    preempt: PreemptionGuard | None = None  # a signal there: checkpoint at the next step boundary and stop
    progress: Progress = field(default_factory=Progress)  # where the loop is, for the hang watchdog (watchdog.py)
    history: list[dict[str, float]] = field(default_factory=list)  # logged training records (bench reads them)
    lm_eval: InLoopScorer | None = None  # eval.tasks: eval/lm_eval.py's InLoopTasks, run by evaluate (collective)
    state: TrainState | None = None  # the final state, once train() returns
    memory: PeakMemory | None = None  # peak memory since the model was built (perf/max_memory_gb)

    @property
    def log(self) -> MetricsLogger:
        """The run's logger: every context but run_eval's (which scores and returns, logging nothing) has one."""
        if self.logger is None:
            raise RuntimeError("this LoopContext logs nothing (run_eval's)")
        return self.logger
