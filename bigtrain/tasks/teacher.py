"""task.teacher: the model a distillation run learns from (task.name distill / distill_classification).

The teacher is any folder `model.init_from` accepts (a run dir, a checkpoint — a LoRA run's with its adapters
merged — or a Hugging Face model folder / hub id), described by its own config (the checkpoint's config.yaml, or
the folder's config.json), never by the student's recipe. It must share the student's tokenizer (the same tokens
under the same ids: the KL compares the two distributions id by id) and, for a classifier, its labels. run.py
builds it like the student (on the meta device for fsdp, partitioned for ZeRO-3) and hands it to the engine's
`frozen`, which keeps it in the compute dtype, sharded like the student, out of the optimizer and checkpoints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from bigtrain.core import safe_load
from bigtrain.config import Config, ModelConfig, build_config
from bigtrain.core.errors import UserError

KEY = "task.teacher"


def teacher_model_config(cfg: Config, folder: Path) -> tuple[ModelConfig, str]:
    """The teacher's model settings and its classifier pooling: a bigtrain checkpoint's config.yaml (its LoRA
    adapters are merged into the weights it loads), or a Hugging Face folder's config.json. Distillation needs the
    student's kind of model: a decoder for distill; any classifier for distill_classification."""
    from bigtrain.interop.hf_config import is_hf_folder, model_keys, read_config, with_hf_model

    if is_hf_folder(folder):
        arch = model_keys(read_config(folder, where=KEY), where=KEY)["arch"]
        probe = dataclasses.replace(cfg, model=ModelConfig(arch=arch, init_from=str(folder), dropout=0.0))
        model, pooling = dataclasses.replace(with_hf_model(probe).model, init_from=None), "auto"
    else:
        saved_path = folder / "config.yaml"
        saved = build_config(safe_load.read_yaml(saved_path), where=str(saved_path))
        model = dataclasses.replace(saved.model, init_from=None, init_revision=None, lora=None)
        pooling = saved.task.pooling
    if cfg.task.name == "distill" and model.arch != "decoder":
        raise UserError(f"{KEY}: {folder} holds {'an' if model.arch == 'encoder' else 'a'} {model.arch} — "
                        f"task.name=distill learns next-token distributions from a decoder")
    return model, pooling


def check_same_tokenizer(folder: Path, student_tokenizer: Path) -> None:
    """A one-line error unless the teacher folder's tokenizer.json maps the same tokens to the same ids as the
    student's."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{KEY}: {folder} has no tokenizer.json — distillation needs the teacher's tokenizer to "
                        f"check it is the student's")
    teacher, student = (Tokenizer.from_file(str(p)).get_vocab(with_added_tokens=True) for p in (path, student_tokenizer))
    if teacher != student:
        differ = sorted(set(teacher.items()) ^ set(student.items()), key=lambda item: item[1])
        example = f" (e.g. {differ[0][0]!r} → {differ[0][1]})" if differ else ""
        raise UserError(f"{KEY}: {folder}'s tokenizer ({len(teacher)} tokens) is not the student's "
                        f"{student_tokenizer} ({len(student)} tokens){example} — distillation needs the same "
                        f"tokenizer: set data.tokenizer to the teacher's")


def check_same_labels(folder: Path, labels: list) -> None:
    """A bigtrain classifier teacher's labels.json must list the student data's labels in the same order."""
    path = folder / "labels.json"
    if path.is_file() and safe_load.read_json(path) != list(labels):
        raise UserError(f"{KEY}: {folder} classifies {safe_load.read_json(path)} but the data's labels are "
                        f"{list(labels)} — distill_classification needs the same labels in the same order")


def planned_teacher(cfg: Config, vocab_size: int):
    """The teacher's ModelSpec for `bigtrain check`, from its config alone (no weights read, nothing downloaded);
    None while its folder is not there yet (a run still to train, a hub id not in the local cache)."""
    from bigtrain.interop.hub import local_folder
    from bigtrain.models import resolve_model_spec

    assert cfg.task.teacher is not None  # asked for by `bigtrain check` only when the recipe names a teacher
    folder = local_folder(cfg.task.teacher, None, download=False, where=KEY)
    if folder is None or not Path(folder).exists():
        return None
    model, pooling = teacher_model_config(cfg, Path(folder))
    classify = cfg.task.data_task == "classification"
    return resolve_model_spec(model, model.vocab_size or vocab_size, head="classify" if classify else "lm",
                              num_labels=2 if classify else None, pooling=pooling)
