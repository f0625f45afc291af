"""A safetensors file written from a WeightsReader, one tensor in memory at a time: what `bigtrain export`,
`bigtrain export --hf` and the PEFT adapter export write."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from typing import Any

import torch

from bigtrain.core.errors import UserError

# torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: Path, reader, metadata: dict[str, str] | None = None) -> None:
    """Stream `reader`'s tensors into one safetensors file: an 8-byte little-endian header length, a JSON
    header (dtype, shape, data_offsets per tensor; padded with spaces to 8 bytes), then the raw bytes in
    header order. Written to PATH.part and renamed, so a failed export leaves no half file behind."""
    entries: dict[str, dict[str, Any]] = {}  # name -> its header entry: dtype name, shape, data_offsets
    offset = 0
    for name, (dtype, shape) in reader.tensors().items():
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"export: tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(int(size) for size in shape) * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = {**({"__metadata__": metadata} if metadata else {}), **entries}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, entry in entries.items():
            tensor = reader.get(name).detach().to("cpu").contiguous()
            if tensor.dtype != _dtype_of(entry["dtype"]) or list(tensor.shape) != entry["shape"]:
                raise UserError(f"export: tensor '{name}' read back as {tensor.dtype} {tuple(tensor.shape)}, its "
                                f"metadata says {entry['dtype']} {tuple(entry['shape'])} — the checkpoint is damaged")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
            del tensor  # one tensor in memory at a time
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _dtype_of(name: str) -> torch.dtype:
    return next(dtype for dtype, st in SAFETENSORS_DTYPES.items() if st == name)
