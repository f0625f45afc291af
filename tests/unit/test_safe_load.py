"""bigtrain/core/safe_load.py against crafted files: every case is refused with one line naming the file (exit 2 from the
CLI), nothing in the file runs, and nothing that existed before the load changes (pathlib.Path, enum members)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from bigtrain.core import safe_load
from bigtrain.core.errors import UserError
from bigtrain.core.filehash import file_entry
from tests.conftest import one_process_fsdp_checkpoint


def _u(text: str) -> bytes:
    """SHORT_BINUNICODE of `text`."""
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


META = "torch.distributed.checkpoint.metadata"


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """A real one-process fsdp checkpoint (DCP folder with manifest), made once."""
    folder, _ = one_process_fsdp_checkpoint(tmp_path_factory.mktemp("dcp") / "run")
    yield folder
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _genuine_metadata(folder) -> bytes:
    return (folder / ".metadata").read_bytes()


def _relative_path_metadata(folder, relative: str) -> bytes:
    """The genuine metadata with one storage file renamed to `relative` (pickled by Python's own pickler)."""
    metadata = safe_load.dcp_metadata(_genuine_metadata(folder), folder=folder, where="genuine")
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = relative
    return pickle.dumps(metadata, protocol=4)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cases(folder, marker) -> dict[str, bytes]:
    genuine = _genuine_metadata(folder)
    body = genuine[2:]  # after PROTO 4: FRAME … STOP
    touch = _u(f"touch {marker}")
    return {
        "reduce of os.system": pickle.dumps(RunsCode(marker)),
        "GLOBAL dotted name": b"\x80\x02c" + META.encode() + b"\nos.system\n(" + touch + b"tR.",
        "STACK_GLOBAL dotted name": b"\x80\x04" + _u(META) + _u("os.system") + b"\x93(" + touch + b"tR.",
        "GLOBAL builtins.exec": b"\x80\x02cbuiltins\nexec\n(" + _u("open('" + str(marker) + "','w')") + b"tR.",
        # the reproduction: BUILD on the class pathlib.PosixPath, then the genuine metadata
        "BUILD on a class": b"\x80\x04cpathlib\nPosixPath\nN}" + _u("_str") + _u("OWNED") + b"s\x86b0" + body,
        "BUILD on a class, dict state": b"\x80\x04cpathlib\nPosixPath\n}" + _u("_str") + _u("OWNED") + b"sb0" + body,
        "BUILD on an enum member": (b"\x80\x04c" + META.encode() + b"\n_MEM_FORMAT_ENCODING\nK\x01\x85R}"
                                    + _u("_value_") + b"K\x07sb0" + body),
        "REDUCE of a class that is no constructor": b"\x80\x04c" + META.encode() + b"\nMetadata\n(}tR.",
        "REDUCE of an allowed constructor, hostile argument": b"\x80\x04ctorch.serialization\n_get_layout\n("
                                                              + _u("os.system") + b"tR.",
        "REDUCE with arguments that are no tuple": b"\x80\x04ctorch\nSize\n}R.",
        "INST": b"(i" + META.encode() + b"\nMetadata\n.",
        "OBJ": b"\x80\x02(c" + META.encode() + b"\nMetadata\no.",
        "NEWOBJ_EX": b"\x80\x04c" + META.encode() + b"\nMetadata\n)}\x92.",
        "NEWOBJ of a constructor": b"\x80\x04cpathlib\nPosixPath\n)\x81.",
        "APPEND to an object": b"\x80\x04cpathlib\nPosixPath\nK\x01a.",
        "SETITEM on an object": b"\x80\x04ctorch\nSize\nK\x01K\x02s.",
        "extension code EXT1": b"\x80\x02\x82\x01.",
        "extension code EXT4": b"\x80\x02\x84" + struct.pack("<i", 1) + b".",
        "persistent id": b"\x80\x02" + _u("storage") + b"Q.",
        "out-of-band buffer": b"\x80\x05\x97.",
        "storage path with ..": _relative_path_metadata(folder, "../../../etc/passwd"),
        "absolute storage path": _relative_path_metadata(folder, "/etc/passwd"),
        "truncated file": genuine[: len(genuine) // 2],
        "a pickle of something else": pickle.dumps({"model.w": 1}),
    }


def test_dcp_metadata_refusals_name_the_file_run_nothing_and_change_nothing(dcp_run, tmp_path, capsys):
    """Each crafted .metadata (with a consistent manifest: a crafted checkpoint, not a damaged one) makes
    `bigtrain export` exit 2 with one line naming the file; nothing ran; pathlib and DCP's enum are untouched."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from bigtrain.cli import main

    marker = tmp_path / "ran"
    enum_before = {m: dict(vars(m)) for m in _MEM_FORMAT_ENCODING}
    for name, payload in _cases(dcp_run, marker).items():
        folder = tmp_path / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(dcp_run, folder)
        (folder / ".metadata").write_bytes(payload)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][".metadata"] = file_entry(folder / ".metadata")
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert main(["export", str(folder), str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bigtrain: error: refusing") and str(folder / ".metadata") in err, \
            (name, err)
        assert not marker.exists(), name
        assert str(pathlib.Path("/a/b")) == "/a/b" and pathlib.PosixPath("x").name == "x", name
        assert {m: dict(vars(m)) for m in _MEM_FORMAT_ENCODING} == enum_before, name
        assert not (tmp_path / "out").exists(), name


def test_the_genuine_metadata_still_loads_and_the_checkpoint_reads_back(dcp_run):
    from bigtrain.checkpoint import open_weights

    metadata = safe_load.dcp_metadata(_genuine_metadata(dcp_run), folder=dcp_run, where=dcp_run / ".metadata")
    assert any(key.startswith("model.") for key in metadata.state_dict_metadata)
    reader = open_weights(dcp_run)
    name, (dtype, shape) = next(iter(reader.tensors().items()))
    assert reader.get(name).shape == shape and reader.get(name).dtype == dtype


def test_a_pathlib_build_would_have_changed_the_whole_process_with_pickles_own_unpickler():
    """Why BUILD is checked: Python's unpickler, restricted by find_class alone (bigtrain's policy before), lets the
    crafted file rewrite a class for the whole process. Run in a child process so this one stays clean."""
    import subprocess
    import sys

    payload = b"\x80\x04cpathlib\nPosixPath\nN}" + _u("_str") + _u("OWNED") + b"s\x86b0N."  # the case's first part
    code = ("import pickle,io,pathlib,sys; pickle.Unpickler(io.BytesIO(sys.stdin.buffer.read())).load(); "
            "print(pathlib.PosixPath._str, pathlib.Path('/tmp/x'))")
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120)
    assert out.stdout.decode().split()[0] == "OWNED", out.stderr.decode()[-500:]


# --------------------------------------------------------------------------- torch files


def _torch_file_with_pickle(path, data_pkl: bytes) -> None:
    """A torch zip file (from torch.save of a plain dict) whose data.pkl is replaced by `data_pkl`."""
    plain = io.BytesIO()
    torch.save({"a": 1}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for item in src.infolist():
            out.writestr(item, data_pkl if item.filename.endswith("/data.pkl") else src.read(item.filename))


def test_torch_files_are_weights_only_and_deepspeed_classes_build_fresh_objects_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed = safe_load.deepspeed_classes()
    good = tmp_path / "good.pt"
    torch.save({"stage": ZeroStageEnum.weights, "w": torch.ones(2)}, good)
    loaded = safe_load.torch_file(good, allowed=allowed)
    assert loaded["stage"] is ZeroStageEnum.weights and torch.equal(loaded["w"], torch.ones(2))

    marker = tmp_path / "ran"
    runs = tmp_path / "runs.pt"
    torch.save({"x": RunsCode(marker)}, runs)
    module = ZeroStageEnum.__module__
    enum_build = tmp_path / "enum.pt"  # the ZeRO stage member, then a BUILD into that shared member
    _torch_file_with_pickle(enum_build, b"\x80\x02c" + module.encode() + b"\nZeroStageEnum\nK\x03\x85R}"
                            + _u("_value_") + b"K\x00sb.")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    for path in (runs, enum_build, truncated):
        with pytest.raises(UserError) as refused:
            safe_load.torch_file(path, where=f"file {path}", allowed=allowed)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert ZeroStageEnum.weights.value == 3 and ZeroStageEnum(3) is ZeroStageEnum.weights
    # Third-party code asking for weights_only=False (DeepSpeed's loads) gets the same policy inside the context.
    with safe_load.weights_only_loads(allowed):
        assert torch.load(good, weights_only=False)["stage"] is ZeroStageEnum.weights
        with pytest.raises(pickle.UnpicklingError):
            torch.load(runs, weights_only=False)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# --------------------------------------------------------------------------- text, arrays, paths


def test_yaml_json_and_arrays_refuse_code_and_name_the_file(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    broken = tmp_path / "b.json"
    broken.write_text('{"step": ')
    objects = tmp_path / "o.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for read, path in ((safe_load.read_yaml, recipe), (safe_load.read_json, broken), (safe_load.load_npy, objects)):
        with pytest.raises(UserError) as refused:
            read(path)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()


def test_paths_named_in_files_stay_in_their_folder(tmp_path):
    (tmp_path / "inner").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "inner" / "link").symlink_to(tmp_path / "secret")
    assert safe_load.inside(tmp_path / "inner", "a/b.bin", where="w") == tmp_path / "inner" / "a" / "b.bin"
    for name in ("../secret", "/etc/passwd", "a/../../secret", "", "link"):
        with pytest.raises(UserError, match="refusing w"):
            safe_load.inside(tmp_path / "inner", name, where="w")


def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused_by_verify(dcp_run, tmp_path, capsys):
    from bigtrain.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_run, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(folder)]) != 0
    out = capsys.readouterr()
    assert "outside its folder" in out.out + out.err


def test_a_checkpoint_config_yaml_that_would_run_code_is_a_one_line_error(dcp_run, tmp_path, capsys):
    """A checkpoint's config.yaml is read through safe_load.read_yaml: a python tag is refused, naming the file."""
    from bigtrain.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_run, folder)
    marker = tmp_path / "ran"
    (folder / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = file_entry(folder / "config.yaml")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(folder), str(tmp_path / "out"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unreadable YAML file {folder / 'config.yaml'}" in err
    assert not marker.exists()
