"""The one place the build order is written: dist → data → task → model → optimizer → engine → resume → loop."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch

from bigtrain.checkpoint import store as checkpoint

from bigtrain.core import safe_load
from bigtrain.config import Config, dump_yaml
from bigtrain.config import recipe_warnings
from bigtrain.data import load_prepared
from bigtrain.data.prepare import cache_visible, prepare_sources, training_prepare_problem, verify_sources_once
from bigtrain.data.tokenizer import tokenizer_file
from bigtrain.parallel.ema import EMA
from bigtrain.core.errors import UserError
from bigtrain.train.context import LoopContext
from bigtrain.train.evaluate import evaluate
from bigtrain.train.loop import train
from bigtrain.core.hardware import matmul_peak, raised_peak
from bigtrain.checkpoint.lease import RunDirLease
from bigtrain.interop.chat_template import TEMPLATE_FILE, TOKENIZER_CONFIG
from bigtrain.metrics import MetricsLogger, PeakMemory
from bigtrain.models import build_model, check_model, count_params
from bigtrain.train.optim import build_optimizer
from bigtrain.train.preempt import PREEMPTED_MARKER, Preempted, PreemptionGuard
from bigtrain.parallel import (Dist, barrier, broadcast_object, build_engine, building, engine_class, open_weights,
                               init_distributed, launcher_precision, resolve_strategy, shutdown)
from bigtrain.parallel.dist import all_gather_object, on_main
from bigtrain.parallel.precision import Resolved, resolve_job_precision, slow_precision_warning
from bigtrain.tasks import build_task
from bigtrain.tasks.teacher import KEY as TEACHER_KEY, check_same_labels, check_same_tokenizer, teacher_model_config
from bigtrain.train.watchdog import Progress, Watchdog, enable_flight_recorder, position

VOCAB_MULTIPLE = 64  # pad the embedding table so matmuls hit fast kernel sizes
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG, TEMPLATE_FILE)  # beside a Hugging Face tokenizer.json


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


INIT_KEY = "model.init_from"


def init_folder(cfg: Config, key: str) -> Path:
    """The folder recipe key `key` (INIT_KEY or TEACHER_KEY) names, resolved (checkpoint.resolve_init_checkpoint)."""
    if key == INIT_KEY:
        return checkpoint.resolve_init_checkpoint(cfg.model.init_from, cfg.model.init_revision, key=key)
    return checkpoint.resolve_init_checkpoint(cfg.task.teacher, key=key)


def init_folders(cfg: Config) -> dict[str, Path]:
    """{recipe key: folder} of model.init_from and task.teacher where set: a start resolves them once, so its
    tokenizer and its weights come from the same checkpoint (a run dir may gain a newer one meanwhile)."""
    return {key: init_folder(cfg, key) for key, source in ((INIT_KEY, cfg.model.init_from),
                                                           (TEACHER_KEY, cfg.task.teacher)) if source}


def with_init_tokenizer(cfg: Config, folders: dict[str, Path] | None = None) -> Config:
    """With model.init_from (else task.teacher: distillation needs the teacher's tokenizer), the tokenizer comes
    from that checkpoint (or Hugging Face folder) unless data.tokenizer is set. `folders`: init_folders(cfg)."""
    key = INIT_KEY if cfg.model.init_from else TEACHER_KEY
    if not (cfg.model.init_from or cfg.task.teacher) or cfg.data.tokenizer:
        return cfg
    folder = folders[key] if folders else init_folder(cfg, key)
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{key}: {folder} has no {TOKENIZER_FILE} — set data.tokenizer")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(folder / TOKENIZER_FILE)))


def with_init_from(cfg: Config, folders: dict[str, Path] | None = None) -> Config:
    """The recipe with what model.init_from brings: the tokenizer, and for a Hugging Face folder the
    model keys of its config.json (so config.yaml records the model exactly; see interop/hf_config.py)."""
    from bigtrain.interop.hf_config import with_hf_model

    return with_init_tokenizer(with_hf_model(cfg), folders)


def model_vocab_size(cfg: Config, tokenizer_vocab_size: int) -> int:
    """Embedding rows: model.vocab_size (an HF model's own) or the tokenizer's size padded to VOCAB_MULTIPLE."""
    if cfg.model.vocab_size is None:
        return padded_vocab_size(tokenizer_vocab_size)
    if cfg.model.vocab_size < tokenizer_vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer_vocab_size} tokens — use the model's own tokenizer or a larger vocab_size")
    return cfg.model.vocab_size


def init_job(cfg: Config) -> Dist:
    """The process group for the recipe's parallel settings (see parallel/dist.py)."""
    p = cfg.parallel
    return init_distributed(p.device, timeout_s=p.init_timeout_s, collective_timeout_s=p.collective_timeout_s)


def log_main(dist: Dist, text: str) -> None:
    if dist.is_main:
        print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Built:
    cfg: Config
    dist: Dist
    data: object  # bigtrain.data.PreparedData
    task: object
    model: torch.nn.Module
    engine: object
    extra_files: dict  # run-dir files every checkpoint carries (tokenizer, labels)
    memory: PeakMemory  # peak memory from just before the model is built (what `bigtrain check` plans)
    base: dict | None = None  # a LoRA run's base.json (checkpoint.base_reference): what its checkpoints leave out


def build(cfg: Config, dist: Dist, folders: dict[str, Path] | None = None) -> Built:
    """Data, task, model (with init_from weights), optimizer and engine, in that order. `folders`: init_folders(cfg),
    resolved by the caller (else here); the files the run reads of them are verified first, each rank its share."""
    run_dir = cfg.run_dir()
    folders = init_folders(cfg) if folders is None else folders
    for key, folder in folders.items():
        checkpoint.verify_init_checkpoint(folder, dist, also=(TOKENIZER_FILE, LABELS_FILE, *TOKENIZER_SIDE_FILES),
                                          key=key)

    # Data: rank 0 tokenizes and packs once (cached) and checksums the shards the first time (sizes after
    # that); the others then open them.
    def prepare_and_verify():
        problem = training_prepare_problem(cfg.data, task=cfg.task.data_task, world_size=dist.world_size,
                                           under_slurm="SLURM_JOB_ID" in os.environ)
        if problem:
            raise UserError(problem)
        prepare_sources(cfg.data, task=cfg.task.data_task, log=lambda m: log_main(dist, m))
        verify_sources_once(cfg.data, task=cfg.task.data_task)

    on_main(dist, prepare_and_verify, what="data preparation")
    check_cache_shared(cfg, dist)
    data = load_prepared(cfg.data, task=cfg.task.data_task, verify=False, seed=cfg.run.seed)
    if hasattr(data.train, "passes"):  # a mixture: how often the run reads each source
        passes = data.train.passes(cfg.train.max_steps * cfg.train.global_batch_size)
        log_main(dist, "data.mixture over the run: " + " · ".join(
            f"{name} {n:.2f} passes" + (" (repeated)" if n > 1 and cfg.data.mixture_exhaust == "repeat" else "")
            for name, n in passes.items()))
    task = build_task(cfg.task, data, seed=cfg.run.seed, document_mask=cfg.data.document_mask)
    extra_files = {TOKENIZER_FILE: run_dir / TOKENIZER_FILE}
    if data.labels:
        extra_files[LABELS_FILE] = run_dir / LABELS_FILE
    # A Hugging Face tokenizer's settings and chat template travel with every checkpoint (export, generate).
    beside = tokenizer_file(cfg.data.tokenizer).parent if cfg.data.tokenizer else None  # its folder's side files
    side_files = {name: beside / name for name in TOKENIZER_SIDE_FILES if beside and (beside / name).is_file()}
    extra_files.update({name: run_dir / name for name in side_files})
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data.path / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        for name, source in side_files.items():
            if source.resolve() != (run_dir / name).resolve():
                shutil.copyfile(source, run_dir / name)
        if data.labels:
            (run_dir / LABELS_FILE).write_text(json.dumps(data.labels))

    # Sharding strategies build on the meta device and initialise after sharding (fsdp), or partition each
    # module as it is built (ZeRO-3): no full copy per rank.
    torch.manual_seed(cfg.run.seed)
    memory = PeakMemory(dist.device)
    head = {"classification": "classify"}.get(cfg.task.data_task, "lm")
    on_meta = engine_class(cfg.parallel, dist.world_size).builds_on_meta
    with building(cfg, dist):
        model = build_model(cfg.model, model_vocab_size(cfg, data.vocab_size), device="meta" if on_meta else dist.device,
                            head=head, num_labels=len(data.labels) if head == "classify" else None,
                            pooling=cfg.task.pooling)
    if cfg.model.lora is not None:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: partitioned
        trained, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
        log_main(dist, f"lora: trainable {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    init_weights = None
    if cfg.model.init_from:
        folder = folders[INIT_KEY]
        report, init_weights = checkpoint.load_init_weights(folder, full_shapes(model), arch=cfg.model.arch)
        if dist.is_main:
            (run_dir / "init_from.json").write_text(json.dumps({"checkpoint": str(folder), **report}, indent=1))
        log_main(dist, f"init_from {folder}: loaded {len(report['loaded'])} tensors · "
                       f"new: {', '.join(report['new']) or 'none'} · unused: {', '.join(report['unused']) or 'none'}")
    engine = build_engine(cfg.parallel, model, lambda m: build_optimizer(cfg.optim, m, dist.device), dist, recipe=cfg)
    if init_weights is not None:
        engine.load_model_weights(init_weights)
    base = None
    if cfg.model.lora is not None and init_weights is not None:  # checkpoints leave the frozen base in the base
        from bigtrain.models.lora import is_trained

        frozen = {name: source for name, source in init_weights.names.items() if not is_trained(name)}
        last_start = run_dir / checkpoint.BASE_FILE  # its digests of local weights files are reused while current
        earlier = safe_load.read_json(last_start) if dist.is_main and last_start.is_file() else None
        base = broadcast_object(dist, checkpoint.base_reference(folder, frozen, earlier) if dist.is_main else None)
        engine.skip_saving = frozenset(frozen)
        extra_files[checkpoint.BASE_FILE] = run_dir / checkpoint.BASE_FILE
        if dist.is_main:
            (run_dir / checkpoint.BASE_FILE).write_text(json.dumps(base, indent=1))
    if cfg.task.teacher:
        task.teacher = build_teacher(cfg, dist, engine, data, head, folders[TEACHER_KEY])
    if cfg.optim.ema_decay:  # averaged from the weights training starts from (a resume loads the saved average)
        sources = engine.ema_sources() if hasattr(engine, "ema_sources") else engine.module  # DeepSpeed: its partitions
        engine.ema = EMA(sources, cfg.optim.ema_decay, cfg.optim.ema_start_step,
                         after_swap=getattr(engine, "release_gathered", None))
    return Built(cfg, dist, data, task, engine.module, engine, extra_files, memory, base)


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each state-dict tensor's full shape (ZeRO-3 keeps a partitioned parameter's in ds_shape)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: tuple(getattr(params.get(name), "ds_shape", None) or t.shape) for name, t in model.state_dict().items()}


def build_teacher(cfg: Config, dist: Dist, engine, data, head: str, folder: Path) -> torch.nn.Module:
    """task.teacher (bigtrain/tasks/teacher.py) from `folder` (resolved and verified by `build`), built as the student was
    (meta device, ZeRO-3 partitioning) from its own config, its weights loaded and the whole model frozen in the
    compute dtype by the engine (`Engine.frozen`)."""
    check_same_tokenizer(folder, data.path / TOKENIZER_FILE)
    if head == "classify":
        check_same_labels(folder, data.labels)
    model_cfg, pooling = teacher_model_config(cfg, folder)
    with building(cfg, dist):
        model = build_model(model_cfg, model_cfg.vocab_size or padded_vocab_size(data.vocab_size),
                            device="meta" if engine.builds_on_meta else dist.device, head=head,
                            num_labels=len(data.labels) if head == "classify" else None, pooling=pooling)
    report, weights = checkpoint.load_init_weights(folder, full_shapes(model), arch=model_cfg.arch, key=TEACHER_KEY)
    if report["new"]:
        raise UserError(f"{TEACHER_KEY}: {folder} has no weights for {', '.join(report['new'][:4])}"
                        f"{' …' if len(report['new']) > 4 else ''} — a teacher must be a complete trained model")
    log_main(dist, f"{TEACHER_KEY} {folder}: {model_cfg.arch} of {count_params(model.spec) / 1e6:.2f}M params, "
                   f"frozen in {str(engine.precision.compute).removeprefix('torch.')}")
    return engine.frozen(model, weights)


def check_cache_shared(cfg: Config, dist: Dist) -> None:
    """Every rank sees the cache rank 0 prepared, or every rank stops with one line naming data.cache_dir (on a
    multi-node job, a folder local to each node: the other nodes' ranks would find nothing there)."""
    if not dist.distributed:
        return
    views = all_gather_object(dist, (cache_visible(cfg.data, task=cfg.task.data_task), socket.gethostname(), dist.rank))
    blind = [(host, rank) for seen, host, rank in views if not seen]
    if blind:
        hosts = sorted({host for host, _ in blind})
        raise UserError(f"data.cache_dir={cfg.data.cache_dir}: rank 0 prepared the data there, but ranks "
                        f"{', '.join(str(rank) for _, rank in blind)} (on {', '.join(hosts)}) do not see it — a folder "
                        f"local to each node? Point data.cache_dir at a filesystem every node mounts")


def resolve_for_job(cfg: Config, dist: Dist) -> tuple[Config, Resolved]:
    """The recipe with `parallel.precision` resolved for this job (rank 0 decides; see parallel/precision.py)."""
    resolved = resolve_job_precision(dist, cfg.parallel.precision, launcher_choice=launcher_precision(cfg.parallel))
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, precision=resolved.name)), resolved


def run_training(cfg: Config, *, bench: bool = False, preempt: PreemptionGuard | None = None) -> LoopContext:
    """Train per the recipe; returns the loop context (state in ctx.state, logged records in ctx.history).
    With `preempt`, a signal there stops training at the next step with a checkpoint: raises Preempted
    after rank 0 has written run_dir/preempted.json (what `bigtrain launch` requeues on).
    config.yaml keeps the recipe's precision (`auto` resolves again on the machine that resumes);
    precision.json records what it resolved to here, and why."""
    folders = init_folders(cfg)
    cfg = with_init_from(cfg, folders)
    check_model(cfg)
    enable_flight_recorder(cfg.run_dir())  # NCCL's record of the last collectives, for a hang (watchdog.py)
    dist = init_job(cfg)
    # From the process group to the exit: a hang anywhere (build, init_from, resume, the loop, the final barrier)
    # gets every rank's stacks and exit 3; a signal anywhere stops the job (preempt.py).
    progress = Progress()
    watchdog = Watchdog(cfg.parallel, dist, progress, cfg.run_dir()).start()
    if preempt is not None:
        preempt.held = lambda: watchdog.firing
        preempt.where = lambda: f"{position(progress.mark)} on rank {dist.rank}"
        preempt.before_exit = ((lambda name: write_preempted_marker(cfg.run_dir(), name, progress.mark[0]))
                               if dist.is_main else None)
    logger = b = saver = lease = None
    try:
        run_dir = cfg.run_dir()
        # One job per run dir (bigtrain/checkpoint/lease.py): taken before anything is written there, held by rank 0.
        lease = on_main(dist, lambda: take_lease(run_dir, cfg.checkpoint.lease_timeout_s), what="the run dir's lease")
        job_cfg, resolved = resolve_for_job(cfg, dist)
        progress.enter("build: data, model, engine")
        b = build(job_cfg, dist, folders)  # creates the run dir
        config_yaml = dump_yaml(cfg)
        if dist.is_main:
            (run_dir / "config.yaml").write_text(config_yaml)
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # an earlier start's; this one may write its own
        verified = checkpoint.VerifiedCheckpoints()  # retention's record: the resumed checkpoint is read once
        progress.enter("resume")
        state = checkpoint.resume(cfg.checkpoint.resume, run_dir, b.engine, dist, warn=lambda m: log_main(dist, m),
                                  base=b.base, verified=verified)
        if b.engine.ema:
            b.engine.ema.step = state.step

        table = b.engine.precision
        peak = None
        if dist.is_main:
            (run_dir / "precision.json").write_text(json.dumps(
                {**table.as_strings(), "requested": resolved.requested, "reason": resolved.reason}, indent=1))
            peak = matmul_peak(dist.device, table.compute, table.param)
        log_main(dist, f"bigtrain: {run_dir} · {resolve_strategy(cfg.parallel.strategy, dist.world_size)} × "
                       f"{dist.world_size} on {dist.device.type} · {cfg.task.name} · "
                       f"{cfg.model.describe()} {count_params(b.model.spec) / 1e6:.2f}M params · "
                       f"{len(b.data.train)} train samples of ≤ {cfg.data.seq_len} tokens · "
                       f"accumulation {cfg.train.accum_steps(dist.world_size)}"
                       + (f" · resuming at step {state.step}" if state.step else ""))
        log_main(dist, f"precision {resolved.describe()}")
        log_main(dist, table.format())
        if dist.is_main:
            log_main(dist, f"MFU {peak.describe()}")
            for line in [*recipe_warnings(cfg), slow_precision_warning(resolved, dist.device)]:
                if line:
                    log_main(dist, line)

        logger = MetricsLogger(cfg.logging, run_dir, enabled=dist.is_main, run_name=cfg.run.name,
                               config=cfg.to_dict(), total_steps=cfg.train.max_steps, start_step=state.step,
                               wandb_run_id=state.wandb_run_id, curves=cfg.logging.curves and not bench)

        def raise_peak(achieved_flops_per_sec: float) -> float:
            nonlocal peak
            peak = raised_peak(peak, achieved_flops_per_sec, dist.device, table.compute, table.param)
            logger.message(f"bigtrain: this run went faster than the MFU peak; now {peak.describe()}")
            return peak.flops_per_sec

        saver = checkpoint.Checkpointer(run_dir, b.engine, dist, config_yaml=config_yaml, keep_last=cfg.checkpoint.keep_last,
                                        extra_files=b.extra_files, async_save=cfg.checkpoint.async_save,
                                        verified=verified, lease=lease)
        ctx = LoopContext(
            cfg=job_cfg, dist=dist, engine=b.engine, task=b.task, train_data=b.data.train, val_data=b.data.validation,
            logger=logger, flops_per_token=b.model.flops_per_token(cfg.data.seq_len),
            peak_flops_per_sec=peak.flops_per_sec if dist.is_main else 1.0,
            raise_peak=raise_peak if dist.is_main else None,
            save_checkpoint=saver.save,
            bench=bench, preempt=preempt, lm_eval=in_loop_tasks(job_cfg, dist, run_dir) if not bench else None,
            memory=b.memory, progress=progress,
        )
        try:
            ctx.state = train(ctx, state)
            saver.wait()  # the last save is durable before the run ends
            if preempt is not None:
                preempt.unsaved = False  # a signal from here on stops at once: everything is saved
        except Preempted as e:
            saver.wait()  # a save of this very step may still be in flight
            if dist.is_main:
                write_preempted_marker(run_dir, e.signal_name, e.step)
            raise
        progress.enter("final barrier")
        barrier(dist)
        return ctx
    except BaseException as e:
        watchdog.diagnose_error(e)  # a collective timeout, or a peer's hang report broke ours: exit 3
        raise
    finally:
        progress.enter("close: saves, logger, engine, process group")
        if saver is not None:
            saver.close()  # on an error too: no save is left half-written by this process's exit
        if logger is not None:
            logger.close()
        if lease is not None:
            lease.release()  # only now: no save of this job is in flight
        if b is not None:
            b.engine.close()  # an engine's own threads and hooks go before the process group does
        shutdown(dist)
        watchdog.stop()


def write_preempted_marker(run_dir: Path, signal_name: str, step: int) -> None:
    """RUN/preempted.json (rank 0): what `bigtrain launch` requeues on, naming the checkpoint to continue from."""
    folder = checkpoint.list_checkpoints(run_dir)[-1:] or [None]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PREEMPTED_MARKER).write_text(json.dumps(
        {"signal": signal_name, "step": step, "checkpoint": str(folder[0]) if folder[0] else None}, indent=1))


def take_lease(run_dir: Path, timeout_s: float) -> RunDirLease:
    """Rank 0: the run dir's lease, taken (or a one-line error naming its live holder) and renewed from now on."""
    lease = RunDirLease(run_dir, timeout_s)
    lease.acquire()
    lease.start_renewing()
    return lease


def in_loop_tasks(cfg: Config, dist: Dist, run_dir: Path):
    """eval.tasks' scorer (lm-eval, imported only when tasks are named), or None."""
    if not cfg.eval.tasks:
        return None
    from bigtrain.eval.lm_eval import InLoopTasks

    return InLoopTasks(cfg.eval, dist, run_dir, batch_size=cfg.eval.micro_batch_size or cfg.train.micro_batch_size)


def run_eval(cfg: Config, folder: Path) -> dict[str, float]:
    """The task's eval metrics of checkpoint `folder` on the validation split (every rank; same result)."""
    check_model(cfg)
    dist = init_job(cfg)
    try:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))
        cfg, _ = resolve_for_job(cfg, dist)
        if cfg.eval.use_ema:
            open_weights(folder, ema=True)  # a checkpoint without EMA weights: a one-line error, not its weights
        b = build(cfg, dist)
        if not len(b.data.validation):  # evaluate would report eval/loss 0, ppl 1
            held_out = "each data.mixture source's validation_split" if cfg.data.mixture else \
                f"data.validation_split={cfg.data.validation_split}"
            raise UserError(f"eval: the validation split of {cfg.run_dir()} is empty ({held_out} held out no "
                            f"document) — nothing to score; hold documents out when training (validation_split > 0)")
        checkpoint.load_base(folder, b.engine)  # a LoRA checkpoint's frozen base tensors, from its base
        b.engine.load_state(folder)
        ctx = LoopContext(cfg=cfg, dist=dist, engine=b.engine, task=b.task, train_data=b.data.train,
                          val_data=b.data.validation, logger=None, flops_per_token=0.0, peak_flops_per_sec=1.0,
                          save_checkpoint=None)
        return evaluate(ctx)
    finally:
        shutdown(dist)
