"""Weights out of a checkpoint without its training state: `model.init_from` (and `task.teacher`) resolved,
verified (only the files it reads) and loaded lazily by name; a LoRA run's base named in base.json, checked and put
back under its adapters (`open_weights`, `with_base`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from bigtrain.checkpoint.manifest import MANIFEST, CheckpointError, verify
from bigtrain.checkpoint.store import BASE_FILE, TRAINER, list_checkpoints
from bigtrain.core import filehash, safe_load
from bigtrain.parallel import Dist, open_format_weights

def resolve_init_checkpoint(path: str, revision: str | None = None, *, key: str = "model.init_from") -> Path:
    """model.init_from → a checkpoint folder (a run dir means its newest checkpoint), or a Hugging Face model folder
    (config.json + weights; a hub id's snapshot; see bigtrain/interop). `key`: the recipe key errors name (task.teacher
    reads a folder the same way). It only lists folders: a start resolves each once, before its process group
    exists, and `verify_init_checkpoint` then checks the files it reads, each rank its share."""
    from bigtrain.interop.hf_config import is_hf_folder, looks_like_hf_folder, read_config
    from bigtrain.interop.hub import local_folder

    where = local_folder(path, revision, where=key)
    if not where.exists():
        raise CheckpointError(f"{key}: no such run dir, checkpoint or Hugging Face folder '{path}'")
    if is_hf_folder(where):
        return where
    if looks_like_hf_folder(where):
        read_config(where, where=key)  # raises: HF weights without a config.json
    if (where / MANIFEST).exists():
        return where
    candidates = list_checkpoints(where)
    if not candidates:
        raise CheckpointError(f"{key}: no complete checkpoint in '{path}'")
    return candidates[-1]


INIT_READS = (TRAINER, "config.yaml", BASE_FILE)  # what init_from reads of a checkpoint besides its weights files


def verify_init_checkpoint(folder: Path, dist: Dist, *, also: tuple[str, ...] = (), key: str = "model.init_from"
                           ) -> None:
    """Check against its manifest what init_from reads of checkpoint `folder` (collective: each rank its share by
    size, as a resume does): the files its format's weights reader opens (`parallel.holds_weights`), INIT_READS and
    `also` (the tokenizer, its side files, the labels). The optimizer state, the rng files and the EMA are never read,
    so never checked: for a 70B model that is most of a checkpoint. A shard that holds optimizer state beside the
    weights (DCP's `__R_0.distcp`, ZeRO's `*_optim_states.pt`) is checked by its manifest's "weights" part when it
    has one (checkpoints saved before parts existed: whole), each rank the shard it wrote, reading just the weights.
    A Hugging Face folder has no manifest."""
    from bigtrain.interop.hf_config import is_hf_folder
    from bigtrain.parallel import holds_weights

    if is_hf_folder(folder):
        return
    small = {*INIT_READS, *also}
    try:
        verify(folder, dist, only=lambda name: name in small or holds_weights(name), weights_parts=True)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e} — point {key} at an intact checkpoint") from None


def load_init_weights(folder: Path, expected: dict[str, tuple[int, ...]], *, arch: str, key: str = "model.init_from"
                      ) -> tuple[dict[str, list[str]], LazyWeights]:
    """Weights of checkpoint `folder` (any strategy's format, or a Hugging Face folder) that match the
    model's tensors `expected` (name -> shape); weights only: no optimizer, no step. A LoRA run's weights come
    with its adapters merged in (a model with model.lora starts new adapters on them).

    Returns ({"loaded", "new", "unused"} tensor names, {name: tensor} to load, read from the folder only
    when looked up: engines copy one tensor at a time, so no rank holds a second full model). A tensor whose shape
    differs, or a checkpoint of another architecture, is a one-line error naming the tensor; except a
    Hugging Face classifier of another num_labels than the data's: that head is new (and the folder's unused),
    as transformers' from_pretrained(num_labels=..., ignore_mismatched_sizes=True) does.
    """
    from bigtrain.interop.hf_config import is_hf_folder

    reader, saved_arch = open_init_reader(folder, key)
    saved = reader.tensors()  # name -> (dtype, shape): nothing read yet
    if saved_arch != arch:
        foreign = next((k for k in saved if k not in expected), next(iter(saved)))
        raise CheckpointError(f"{key}: {folder} holds a '{saved_arch}' model (e.g. tensor '{foreign}'), "
                              f"but model.arch is '{arch}' — set model.arch: {saved_arch} or pick another checkpoint")
    other_head = {name for name, shape in expected.items() if is_hf_folder(folder) and name.startswith("classifier.")
                  and name in saved and tuple(saved[name][1]) != tuple(shape)}  # another num_labels: a new head
    for name, shape in expected.items():
        if name in saved and name not in other_head and tuple(saved[name][1]) != tuple(shape):
            raise CheckpointError(f"{key}: tensor '{name}' is {tuple(saved[name][1])} in {folder} but "
                                  f"{tuple(shape)} in this model — the model settings must match the checkpoint's")
    # An HF classifier folder has no MLM head; a tied one is the token embedding it holds (encoders are tied).
    tied = [k for k in ("lm_head.weight", "mlm_head.proj.weight") if is_hf_folder(folder) and k in expected
            and k not in saved and "tok_emb.weight" in saved]
    loaded = [k for k in expected if (k in saved and k not in other_head) or k in tied]
    report: dict[str, list[str]] = {"loaded": loaded, "new": [k for k in expected if k not in loaded],
              "unused": [k for k in saved if k not in loaded]}
    return report, LazyWeights(reader, {k: "tok_emb.weight" if k in tied else k for k in loaded})


def open_init_reader(folder: Path, key: str = "model.init_from"):
    """(WeightsReader under bigtrain's tensor names, arch) of what init_from reads in `folder`: a Hugging Face
    folder's weights, or a checkpoint's (a LoRA run's with its adapters merged into the weights they adapt)."""
    from bigtrain.interop.hf_config import is_hf_folder

    if is_hf_folder(folder):
        from bigtrain.interop.hf_weights import open_hf_weights

        hf_reader = open_hf_weights(folder, where=key)
        return hf_reader, hf_reader.arch
    reader = open_weights(folder)
    saved_model = safe_load.read_yaml(folder / "config.yaml").get("model", {})
    if saved_model.get("lora"):
        from bigtrain.config import LoraConfig
        from bigtrain.models.lora import MergedLoRAWeights

        reader = MergedLoRAWeights(reader, LoraConfig(**saved_model["lora"]).scaling)
    return reader, saved_model.get("arch", "decoder")


def base_reference(folder: Path, tensors: dict[str, str], earlier: dict | None = None) -> dict:
    """base.json of a LoRA run started from `folder`: its path, a sha256 of its weights, and `tensors` (model name →
    the name init_from read it under) that checkpoints leave out. A bigtrain checkpoint is identified by its
    manifest (every file's sha256); a Hugging Face folder by its weights files' digests (a hub snapshot's files
    are blobs named by their sha256; a local folder's are read, and kept in base.json's `files` with their size
    and mtime: `earlier`, the base.json of the run's last start, saves reading them again while those are the
    same — for an 8B model, ~16 GB at each resume)."""
    import hashlib

    from bigtrain.interop.hf_config import is_hf_folder

    folder = Path(folder).absolute()
    known = (earlier or {}).get("files", {}) if (earlier or {}).get("init_from") == str(folder) else {}
    digest, files = hashlib.sha256(), {}
    if is_hf_folder(folder):
        for path in sorted(folder.iterdir()):
            if path.suffix in (".safetensors", ".bin", ".pt") or path.name.endswith(".index.json"):
                blob = path.resolve().name
                if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
                    file_digest = blob
                else:
                    stat, seen = path.stat(), known.get(path.name, {})
                    same = (seen.get("bytes"), seen.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
                    file_digest = seen["sha256"] if same else filehash.sha256(path)
                    files[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_digest}
                digest.update(f"{path.name} {file_digest}\n".encode())
    else:
        digest.update((folder / MANIFEST).read_bytes())
    return {"init_from": str(folder), "sha256": digest.hexdigest(), "tensors": tensors, **({"files": files} if files else {})}


def check_base(folder: Path, current: dict | None = None) -> dict:
    """The base.json of checkpoint `folder` (LoRA adapters saved without their base), once the base it names is
    checked to be the one they were trained on: the same sha256 (`base_reference`). `current`: the base_reference of
    the base a resumed run was built on; else the base at the path base.json names is digested again, a local
    weights file's digest reused only while its size and mtime are the ones base.json recorded with it. Adapters on
    another base compute another model, silently: a missing or changed base is a CheckpointError naming it. Every
    path that opens a base (resume, `with_base`: export, eval, generate, lm-eval, init_from) checks it here."""
    saved = safe_load.read_json(Path(folder) / BASE_FILE)
    trained_on = f"checkpoint {folder} holds LoRA adapters trained on {saved['init_from']} (sha256 {saved['sha256'][:12]})"
    if current is None:
        base_folder = Path(saved["init_from"])
        if not base_folder.exists():
            raise CheckpointError(f"{trained_on}, which is gone — put the base back there")
        try:
            current = base_reference(base_folder, saved["tensors"], earlier=saved)
        except OSError as e:  # e.g. a checkpoint base without its manifest any more
            raise CheckpointError(f"{trained_on}, which cannot be read ({e}) — put the base back there") from None
        if current["sha256"] != saved["sha256"]:
            raise CheckpointError(f"{trained_on}, but that base has changed since (sha256 now {current['sha256'][:12]})"
                                  f" — put back the base the adapters were trained on")
    elif current["sha256"] != saved["sha256"]:
        raise CheckpointError(f"{trained_on}, but model.init_from is now {current['init_from']} (sha256 "
                              f"{current['sha256'][:12]}) — resume with the base it was trained on")
    return saved


def open_weights(folder: Path, ema: bool = False):
    """A reader of the model weights in checkpoint `folder`, whatever strategy wrote it (`ema`: its EMA weights); a
    LoRA run's adapters-only checkpoint (base.json) with its base's tensors read from the base."""
    reader = open_format_weights(folder, ema=ema)
    return with_base(reader, folder) if (Path(folder) / BASE_FILE).is_file() else reader


def with_base(reader, folder: Path):
    """`reader` (a checkpoint's own tensors) with the base tensors its base.json names put back, read from the
    base on lookup (once `check_base` found it unchanged): the whole model, as a checkpoint that held it would give."""
    saved = check_base(folder)
    base, _ = open_init_reader(Path(saved["init_from"]), key=f"{folder / BASE_FILE}")
    return BaseOverlay(reader, base, saved["tensors"])


class BaseOverlay:
    """A WeightsReader: a checkpoint's own tensors, plus `names` (model name → base name) read from `base`."""

    def __init__(self, own, base, names: dict[str, str]):
        self.own, self.base, self.names = own, base, names
        self._own = own.tensors()

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        in_base = self.base.tensors()
        return {**{name: in_base[source] for name, source in self.names.items()}, **self._own}

    def get(self, name: str) -> torch.Tensor:
        return self.own.get(name) if name in self._own else self.base.get(self.names[name])


def load_base(folder: Path, engine) -> None:
    """Before `engine.load_state(folder)` of a checkpoint holding only LoRA adapters (base.json) into a model built
    without its base (`bigtrain eval`): the base tensors, loaded from the base."""
    if not (folder / BASE_FILE).is_file():
        return
    names = safe_load.read_json(folder / BASE_FILE)["tensors"]
    engine.skip_saving = frozenset(names)
    engine.load_model_weights(LazyWeights(open_weights(folder), {name: name for name in names}))


class LazyWeights(Mapping[str, torch.Tensor]):
    """{model tensor name: full tensor} whose values a WeightsReader reads on lookup (never kept)."""

    def __init__(self, reader, names: dict[str, str]):
        self.reader, self.names = reader, names  # model name -> the name in the checkpoint

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.get(self.names[name])

    def __contains__(self, name: object) -> bool:  # Mapping's would read the tensor (a `get` that may raise)
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
