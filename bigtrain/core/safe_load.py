"""Every deserialisation policy in one place: nothing bigtrain reads from a file can run code or change the process.

What a file may hold, by kind:

- torch files (weights, optimizer state, rng, DeepSpeed's files, HF `pytorch_model.bin`): torch's own weights-only
  unpickler (`torch_file`), plus, for DeepSpeed's files, DeepSpeed's plain-data classes. DeepSpeed and its converters
  read their files again themselves with `weights_only=False`; `weights_only_loads()` forces those reads through the
  same weights-only unpickler, so the bytes DeepSpeed uses pass the policy the check applied (no window between a
  check and a use).
- DCP `.metadata` (a plain pickle): `dcp_metadata`, a stricter unpickler than torch's (below), then every storage
  path in it confined to the checkpoint folder.
- YAML (`yaml.safe_load`), JSON and numpy arrays (`allow_pickle=False`): `read_yaml`, `read_json`, `load_npy`.
- Paths named inside a file (a manifest's file names, a DCP storage path, a Hugging Face index's shard names):
  `inside(folder, name)`, which refuses absolute paths and `..`.

Every refusal is a `UserError` whose one line names the file; nothing of the file has run, and no object that
existed before the load has been changed.

The DCP unpickler admits only the opcodes plain data needs, names from an exact allowlist (`module` → names; no
dotted names, which pickle resolves as attribute paths), calls (REDUCE) only of allowed constructors, NEWOBJ only
of allowed classes, and BUILD (`__setstate__` or `__dict__` update) only on an instance NEWOBJ made in this very
load and not yet built: a BUILD aimed at a class, a module object, an enum member or any other shared object — the
way a pickle would change `pathlib.Path` for the whole process — is refused. No INST/OBJ/NEWOBJ_EX, no extension
registry, no persistent ids, no out-of-band buffers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from bigtrain.core.errors import UserError


class UnsafeFile(UserError):
    """A file bigtrain refuses to read: it would run code, it is damaged, or it names a path outside its folder."""


# --------------------------------------------------------------------------- paths named inside files


def inside(folder: str | os.PathLike, name: str, *, where: str | os.PathLike) -> Path:
    """`folder / name` for a relative `name` read from the file `where`; refuses an absolute path, a `..` step, or
    a path that resolves (through a link) outside `folder`."""
    parts = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name) or parts.is_absolute() or ".." in parts.parts or os.path.isabs(str(name)):
        raise UnsafeFile(f"refusing {where}: it names the path '{name}', outside its folder {folder}")
    path = Path(folder) / parts
    base = Path(folder).resolve()
    if path.exists() and not path.resolve().is_relative_to(base):
        raise UnsafeFile(f"refusing {where}: '{name}' leads outside its folder {folder}")
    return path


# --------------------------------------------------------------------------- text formats


def read_json(path: str | os.PathLike):
    """A JSON file's value; a file that does not parse is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeFile(f"unreadable JSON file {path}: {e}") from None


def read_yaml(path: str | os.PathLike):
    """A YAML file's value through `yaml.safe_load` (plain data only; an empty file is {})."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UnsafeFile(f"unreadable YAML file {path}: {str(e).splitlines()[0]}") from None


def load_npy(path: str | os.PathLike, mmap: bool = True):
    """A .npy array, memory-mapped by default; object arrays (pickles) are refused."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UnsafeFile(f"unreadable array file {path}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- torch files


def torch_file(source, *, where: str | os.PathLike | None = None, allowed=(), map_location="cpu",
               mmap: bool = False):
    """torch.load through torch's weights-only unpickler (tensors, plain containers, dtypes) plus `allowed` classes
    (or `(constructor, "module.Name")` pairs); anything else is a one-line error naming the file."""
    import torch

    where = source if where is None else where
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UnsafeFile(f"missing file {where}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError) as e:
        raise UnsafeFile(_torch_refusal(where, e)) from None


def _torch_refusal(where, error: Exception) -> str:
    import re

    found = re.search(r"GLOBAL (\S+)", str(error))
    why = (f"it would run '{found.group(1)}', which is not a tensor or plain data" if found
           else f"it is not a readable torch file ({(str(error).splitlines() or [type(error).__name__])[0][:160]})")
    return f"refusing {where}: {why}"


def deepspeed_classes() -> list:
    """The only non-torch objects DeepSpeed pickles into its checkpoints: loss scalers and fragment offsets
    (attribute bags, built fresh by the load), and the ZeRO stage, an enum member: admitted through a constructor
    registered under its name, so the load can look a member up but never BUILD into the shared member itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def zero_stage(value):
        return ZeroStageEnum(int(value))

    return [LossScaler, DynamicLossScaler, fragment_address,
            (zero_stage, f"{ZeroStageEnum.__module__}.{ZeroStageEnum.__qualname__}")]


@contextlib.contextmanager
def weights_only_loads(allowed=()):
    """Inside: every `torch.load` in this process is weights-only whatever its caller asked
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD), with `allowed` admitted: for third-party code that reads checkpoint files
    itself with `weights_only=False` (DeepSpeed's load_checkpoint, zero_to_fp32, ds_to_universal)."""
    import torch

    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# --------------------------------------------------------------------------- DCP .metadata


def _dcp_allowlist() -> tuple[dict[str, set[str]], set[str]]:
    """(module → names a DCP .metadata may name, names among them that REDUCE may call)."""
    classes = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                                  "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    }
    constructors = {
        "torch.distributed.checkpoint.metadata": {"_MEM_FORMAT_ENCODING"},  # an enum: a member by its value
        "torch.serialization": {"_get_layout"},  # a layout by its name (a lookup in torch's table)
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # Python 3.13+
        "collections": {"OrderedDict"},
    }
    names = {m: classes.get(m, set()) | constructors.get(m, set()) for m in {*classes, *constructors}}
    return names, {f"{m}.{n}" for m, ns in constructors.items() for n in ns}


_PLAIN_OPS = {
    pickle.PROTO, pickle.FRAME, pickle.STOP, pickle.MARK, pickle.POP, pickle.POP_MARK, pickle.DUP,
    pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.INT, pickle.BININT, pickle.BININT1, pickle.BININT2,
    pickle.LONG, pickle.LONG1, pickle.LONG4, pickle.FLOAT, pickle.BINFLOAT,
    pickle.STRING, pickle.BINSTRING, pickle.SHORT_BINSTRING, pickle.UNICODE, pickle.BINUNICODE,
    pickle.SHORT_BINUNICODE, pickle.BINUNICODE8, pickle.BINBYTES, pickle.SHORT_BINBYTES, pickle.BINBYTES8,
    pickle.EMPTY_TUPLE, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
    pickle.EMPTY_LIST, pickle.LIST, pickle.EMPTY_DICT, pickle.DICT, pickle.EMPTY_SET, pickle.FROZENSET,
    pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE,
    pickle.GLOBAL, pickle.STACK_GLOBAL,  # through find_class's allowlist
}  # + the checked REDUCE, NEWOBJ, BUILD and container opcodes below; nothing else


class _Opcodes(dict):
    def __missing__(self, code: int):
        raise pickle.UnpicklingError(f"it uses pickle opcode {bytes([code])!r}, which plain data does not need")


class _PlainDataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with its dispatch table cut down to plain data and checked object creation."""

    # pickle._Unpickler's own, which typeshed's stub leaves out: load() sets the stack and append, pop_mark is a method
    stack: list[Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]

    dispatch = _Opcodes({code: fn for code, fn in pickle._Unpickler.dispatch.items() if bytes([code]) in _PLAIN_OPS})

    def __init__(self, file):
        super().__init__(file, fix_imports=False)
        self._names, constructors = _dcp_allowlist()
        resolved = {f"{m}.{n}": obj for m, ns in self._names.items() for n in ns
                    if (obj := _resolve(m, n)) is not None}
        self._constructors = {id(obj) for key, obj in resolved.items() if key in constructors}
        self._classes = {id(obj) for key, obj in resolved.items() if key not in constructors}
        self._fresh: set[int] = set()  # ids of instances NEWOBJ made here that no BUILD has touched yet
        self._made: list = []  # keeps them alive, so no id is reused during the load

    def find_class(self, module: str, name: str):
        import torch

        dtype = module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype)
        if not (dtype or (name.isidentifier() and name in self._names.get(module, ()))):
            raise pickle.UnpicklingError(f"it names {module + '.' + name!r}, which is not allowed in a DCP .metadata")
        return super().find_class(module, name)

    @staticmethod
    def _name(obj) -> str:
        kind = obj if isinstance(obj, type) or callable(obj) else type(obj)
        return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._constructors or type(args) is not tuple:
            raise pickle.UnpicklingError(f"it calls {self._name(func)!r}, which a DCP .metadata may not call")
        try:
            self.stack[-1] = func(*args)
        except Exception as e:  # noqa: BLE001 — an allowed constructor given arguments it does not take
            raise pickle.UnpicklingError(f"it calls {self._name(func)!r} with arguments it refuses ({e!r})") from None

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if id(cls) not in self._classes or type(args) is not tuple:
            raise pickle.UnpicklingError(f"it makes {self._name(cls)!r}, which a DCP .metadata may not make")
        obj = cls.__new__(cls, *args)
        self._fresh.add(id(obj))
        self._made.append(obj)
        self.append(obj)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(inst) not in self._fresh:
            raise pickle.UnpicklingError(f"it sets the state of {self._name(inst)!r}, an object this load did not make")
        self._fresh.discard(id(inst))
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None and setstate is not getattr(object, "__setstate__", None):
            setstate(inst, state)  # the allowed class's own, on its fresh instance
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        for part in (state, slotstate):
            if part is not None and not (type(part) is dict and all(type(k) is str for k in part)):
                raise pickle.UnpicklingError("it sets an object's state from something that is not a dict of names")
        inst.__dict__.update(state or {})
        for key, value in (slotstate or {}).items():
            object.__setattr__(inst, key, value)

    def _container(self, kinds: tuple[type, ...]):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise pickle.UnpicklingError(f"it adds items to {self._name(target)!r}, which is not a plain container")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._container((list,)).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._container((list,)).extend(items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._container((dict, OrderedDict))[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._container((dict, OrderedDict))
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        self._container((set,)).update(items)


for _code, _method in ((pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"), (pickle.BUILD, "load_build"),
                       (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"),
                       (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                       (pickle.ADDITEMS, "load_additems")):
    _PlainDataUnpickler.dispatch[_code[0]] = getattr(_PlainDataUnpickler, _method)
del _code, _method


def _resolve(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pathlib._local before Python 3.13
        return None


def dcp_metadata(data: bytes, *, folder: str | os.PathLike, where: str | os.PathLike):
    """A DCP `.metadata` (its bytes) as DCP's `Metadata`, through `_PlainDataUnpickler`; every storage file it
    names must lie inside `folder`. Anything else: a one-line error naming `where`."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _PlainDataUnpickler(io.BytesIO(data)).load()
    except UnsafeFile:
        raise
    except Exception as e:  # noqa: BLE001 — whatever a crafted or truncated pickle raises, it is refused as one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, EOFError) or "truncated" in reason or "ran out" in reason:
            reason = f"truncated ({reason})"
        raise UnsafeFile(f"refusing DCP checkpoint file {where}: {reason}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeFile(f"refusing DCP checkpoint file {where}: it holds a {type(metadata).__name__}, not DCP metadata")
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        inside(folder, str(getattr(info, "relative_path", "")), where=where)
    return metadata
