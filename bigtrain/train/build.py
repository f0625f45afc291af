"""A job's pieces from its recipe, built in one order: data → task → model (init_from's weights) → optimizer →
engine (a LoRA run's base, the teacher, the EMA). model.init_from and task.teacher are resolved once per start
(init_folders) and give the recipe their tokenizer (with_init_from). run.py builds a job with `build`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from bigtrain import checkpoint
from bigtrain.config import Config
from bigtrain.core import safe_load
from bigtrain.core.errors import UserError
from bigtrain.data import load_prepared
from bigtrain.data.prepare import (PreparedData, cache_visible, prepare_sources, training_prepare_problem,
                                   verify_sources_once)
from bigtrain.data.tokenizer import tokenizer_file
from bigtrain.interop.chat_template import TEMPLATE_FILE, TOKENIZER_CONFIG
from bigtrain.metrics import PeakMemory
from bigtrain.models import build_model, count_params
from bigtrain.parallel import Dist, Engine, broadcast_object, build_engine, building, engine_class
from bigtrain.parallel.dist import all_gather_object, on_main
from bigtrain.parallel.ema import EMA
from bigtrain.tasks import Task, build_task
from bigtrain.tasks.distill import Distill, DistillClassification
from bigtrain.tasks.teacher import KEY as TEACHER_KEY, check_same_labels, check_same_tokenizer, teacher_model_config
from bigtrain.train.optim import build_optimizer

if TYPE_CHECKING:
    from bigtrain.models.transformer import Transformer

VOCAB_MULTIPLE = 64  # pad the embedding table so matmuls hit fast kernel sizes
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG, TEMPLATE_FILE)  # beside a Hugging Face tokenizer.json


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


INIT_KEY = "model.init_from"


def init_folder(cfg: Config, key: str) -> Path:
    """The folder recipe key `key` (INIT_KEY or TEACHER_KEY) names, resolved (checkpoint.resolve_init_checkpoint)."""
    source = cfg.model.init_from if key == INIT_KEY else cfg.task.teacher
    assert source, f"{key} is not set"  # asked only for a key the recipe sets
    if key == INIT_KEY:
        return checkpoint.resolve_init_checkpoint(source, cfg.model.init_revision, key=key)
    return checkpoint.resolve_init_checkpoint(source, key=key)


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


def log_main(dist: Dist, text: str) -> None:
    """A line of the job's start-up report, to stderr, once (rank 0)."""
    if dist.is_main:
        print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Built:
    """A job's pieces, built by `build` in its order."""

    cfg: Config
    dist: Dist
    data: PreparedData
    task: Task
    model: Transformer
    engine: Engine
    extra_files: dict[str, Path]  # run-dir files every checkpoint carries (tokenizer, labels)
    memory: PeakMemory  # peak memory from just before the model is built (what `bigtrain check` plans)
    base: dict | None = None  # a LoRA run's base.json (checkpoint.base_reference): what its checkpoints leave out


def build(cfg: Config, dist: Dist, folders: dict[str, Path] | None = None) -> Built:
    """Data, task, model (with init_from weights), optimizer and engine, in that order. `folders`: init_folders(cfg),
    resolved by the caller (else here); the files the run reads of them are verified first, each rank its share."""
    folders = init_folders(cfg) if folders is None else folders
    for key, folder in folders.items():
        checkpoint.verify_init_checkpoint(folder, dist, also=(TOKENIZER_FILE, LABELS_FILE, *TOKENIZER_SIDE_FILES),
                                          key=key)
    data = build_data(cfg, dist)
    task = build_task(cfg.task, data, seed=cfg.run.seed, document_mask=cfg.data.document_mask)
    extra_files = write_run_files(cfg, dist, data)
    torch.manual_seed(cfg.run.seed)  # the model's initial weights follow run.seed
    memory = PeakMemory(dist.device)  # from just before the model is built (what `bigtrain check` plans)
    model = build_trained_model(cfg, dist, data)
    init_weights = load_init_from(cfg, dist, model, folders[INIT_KEY]) if cfg.model.init_from else None
    engine = build_engine(cfg.parallel, model, lambda m: build_optimizer(cfg.optim, m, dist.device), dist, recipe=cfg)
    if init_weights is not None:
        engine.load_model_weights(init_weights)
    base = None
    if cfg.model.lora is not None and init_weights is not None:  # checkpoints leave the frozen base in the base
        base = leave_out_base(cfg, dist, engine, init_weights, folders[INIT_KEY], extra_files)
    if cfg.task.teacher:
        assert isinstance(task, (Distill, DistillClassification))  # validate: task.teacher only with these
        task.teacher = build_teacher(cfg, dist, engine, data, model_head(cfg), folders[TEACHER_KEY])
    if cfg.optim.ema_decay:  # averaged from the weights training starts from (a resume loads the saved average)
        sources = engine.ema_sources() if hasattr(engine, "ema_sources") else engine.module  # DeepSpeed: its partitions
        engine.ema = EMA(sources, cfg.optim.ema_decay, cfg.optim.ema_start_step,
                         after_swap=getattr(engine, "release_gathered", None))
    return Built(cfg, dist, data, task, cast("Transformer", engine.module), engine, extra_files, memory, base)


def build_data(cfg: Config, dist: Dist) -> PreparedData:
    """The prepared data: rank 0 tokenizes and packs once (cached) and checksums the shards the first time (sizes
    after that); the others then open them."""

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
    return data


def write_run_files(cfg: Config, dist: Dist, data: PreparedData) -> dict[str, Path]:
    """The run-dir files every checkpoint carries (the tokenizer, its side files, the labels), written by rank 0
    (creating the run dir): {name: path}."""
    run_dir = cfg.run_dir()
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
    return extra_files


def model_head(cfg: Config) -> str:
    """The model's output head for the task: a classifier, else the LM head."""
    return {"classification": "classify"}.get(cfg.task.data_task, "lm")


def build_trained_model(cfg: Config, dist: Dist, data: PreparedData) -> Transformer:
    """The model the run trains, initialised (init_from's weights come later, through the engine)."""
    # Sharding strategies build on the meta device and initialise after sharding (fsdp), or partition each
    # module as it is built (ZeRO-3): no full copy per rank.
    head = model_head(cfg)
    on_meta = engine_class(cfg.parallel, dist.world_size).builds_on_meta
    with building(cfg, dist):
        model = build_model(cfg.model, model_vocab_size(cfg, data.vocab_size), device="meta" if on_meta else dist.device,
                            head=head, num_labels=len(data.labels or ()) if head == "classify" else None,
                            pooling=cfg.task.pooling)
    if cfg.model.lora is not None:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: partitioned
        trained, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
        log_main(dist, f"lora: trainable {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    return model


def load_init_from(cfg: Config, dist: Dist, model: torch.nn.Module, folder: Path) -> checkpoint.LazyWeights:
    """model.init_from's weights for `model` (read lazily), what was loaded recorded in RUN/init_from.json."""
    report, init_weights = checkpoint.load_init_weights(folder, full_shapes(model), arch=cfg.model.arch)
    if dist.is_main:
        (cfg.run_dir() / "init_from.json").write_text(json.dumps({"checkpoint": str(folder), **report}, indent=1))
    log_main(dist, f"init_from {folder}: loaded {len(report['loaded'])} tensors · "
                   f"new: {', '.join(report['new']) or 'none'} · unused: {', '.join(report['unused']) or 'none'}")
    return init_weights


def leave_out_base(cfg: Config, dist: Dist, engine: Engine, init_weights: checkpoint.LazyWeights, folder: Path,
                   extra_files: dict[str, Path]) -> dict:
    """A LoRA run's checkpoints leave its frozen base out: base.json names it in init_from `folder` (written to the
    run dir, carried by every checkpoint); returns it."""
    from bigtrain.models.lora import is_trained

    run_dir = cfg.run_dir()
    frozen = {name: source for name, source in init_weights.names.items() if not is_trained(name)}
    last_start = run_dir / checkpoint.BASE_FILE  # its digests of local weights files are reused while current
    earlier = safe_load.read_json(last_start) if dist.is_main and last_start.is_file() else None
    base = broadcast_object(dist, checkpoint.base_reference(folder, frozen, earlier) if dist.is_main else None)
    engine.skip_saving = frozenset(frozen)
    extra_files[checkpoint.BASE_FILE] = run_dir / checkpoint.BASE_FILE
    if dist.is_main:
        (run_dir / checkpoint.BASE_FILE).write_text(json.dumps(base, indent=1))
    return base


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each state-dict tensor's full shape (ZeRO-3 keeps a partitioned parameter's in ds_shape)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: tuple(getattr(params.get(name), "ds_shape", None) or t.shape) for name, t in model.state_dict().items()}


def build_teacher(cfg: Config, dist: Dist, engine: Engine, data: PreparedData, head: str,
                  folder: Path) -> torch.nn.Module:
    """task.teacher (bigtrain/tasks/teacher.py) from `folder` (resolved and verified by `build`), built as the student was
    (meta device, ZeRO-3 partitioning) from its own config, its weights loaded and the whole model frozen in the
    compute dtype by the engine (`Engine.frozen`)."""
    check_same_tokenizer(folder, data.path / TOKENIZER_FILE)
    if head == "classify":
        check_same_labels(folder, data.labels or [])
    model_cfg, pooling = teacher_model_config(cfg, folder)
    with building(cfg, dist):
        model = build_model(model_cfg, model_cfg.vocab_size or padded_vocab_size(data.vocab_size),
                            device="meta" if engine.builds_on_meta else dist.device, head=head,
                            num_labels=len(data.labels or ()) if head == "classify" else None, pooling=pooling)
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

