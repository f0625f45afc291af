"""`bigtrain export` and `verify`: the commands on a run's checkpoint files (consolidated weights out, in
bigtrain's or Hugging Face's format; every byte checked against the manifest)."""

from __future__ import annotations

import sys

from bigtrain.core.errors import UserError


def cmd_export(args) -> int:
    from bigtrain.checkpoint.export import export, export_hf

    if args.format == "hf":
        out = export_hf(args.source, args.out, dtype=args.dtype, max_shard_bytes=_size_bytes(args.max_shard_size),
                        ema=args.ema, adapter=args.adapter)
    elif args.adapter:
        raise UserError("export --adapter writes a PEFT adapter folder: add --format hf")
    else:
        out = export(args.source, args.out, ema=args.ema)
    print(f"bigtrain: exported {out}" + (" (Hugging Face format)" if args.format == "hf" else ""), file=sys.stderr)
    return 0


def _size_bytes(text: str) -> int:
    """'500MB' / '5GB' / '2GiB' / a plain byte count -> bytes (decimal units, as save_pretrained's)."""
    import re

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise UserError(f"export --max-shard-size: cannot read '{text}' — use e.g. 500MB or 5GB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def cmd_verify(args) -> int:
    from pathlib import Path

    from bigtrain import checkpoint

    source = Path(args.source)
    folders = [source] if (source / checkpoint.MANIFEST).exists() else checkpoint.list_checkpoints(source)
    if not folders:
        raise UserError(f"verify: no checkpoint in '{source}' (neither a run dir with checkpoints/ nor a checkpoint)")
    damaged = 0
    if (source / "config.yaml").is_file() and not (source / checkpoint.MANIFEST).exists():  # a run dir: its data too
        from bigtrain.config import load_config
        from bigtrain.data import data_cache_path, load_prepared
        from bigtrain.data.prepare import source_configs

        cfg = load_config(source / "config.yaml")
        for data_cfg in source_configs(cfg.data, task=cfg.task.data_task):  # a mixture: each source's cache
            path = data_cache_path(data_cfg, task=cfg.task.data_task)
            try:
                load_prepared(data_cfg, task=cfg.task.data_task, verify=True)
                print(f"ok       data {path}")
            except UserError as e:
                damaged += 1
                print(f"damaged  data {path}: {e}")
    for folder in folders:
        try:
            manifest = checkpoint.verify(folder)
            size = sum(entry["bytes"] for entry in manifest["files"].values())
            print(f"ok       {folder} ({len(manifest['files'])} files, {size / 2**20:,.1f} MiB)")
        except checkpoint.CheckpointError as e:
            damaged += 1
            print(f"damaged  {folder}: {e}")
    if damaged:
        raise UserError(f"verify: {damaged} damaged in '{source}' (listed above)")
    return 0
