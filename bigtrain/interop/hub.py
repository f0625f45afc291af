"""Hugging Face hub ids as `model.init_from`: "org/name" that is not a local path → a local snapshot folder.

`huggingface_hub.snapshot_download` fetches (or finds in its cache: `HF_HUB_CACHE`, `HF_HOME`) the
files an import reads — config.json, safetensors weights and their index, the tokenizer files — at
`model.init_revision` (a branch, tag or commit; default main). It honours `HF_HUB_OFFLINE=1` and
`HF_TOKEN`. Runs download (every rank: the hub library locks each file, so ranks wait for one
download); `bigtrain check` and `bigtrain launch` only look in the cache. Torch-free.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal, overload

from bigtrain.core.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# What an import reads (a repo's .bin / TF / Flax / ONNX copies are never fetched).
IMPORT_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def is_hub_id(value: str) -> bool:
    """An "org/name" (or "name") that is not a path on this machine."""
    return bool(HUB_ID.match(value)) and not Path(value).expanduser().exists()


# download=True gives a folder or raises: only a cache look-up (download=False) may find nothing.
@overload
def local_folder(init_from: str, revision: str | None = None, *, download: Literal[True] = True,
                 where: str = "model.init_from") -> Path: ...


@overload
def local_folder(init_from: str, revision: str | None = None, *, download: bool,
                 where: str = "model.init_from") -> Path | None: ...


def local_folder(init_from: str, revision: str | None = None, *, download: bool = True,
                 where: str = "model.init_from") -> Path | None:
    """The local folder `init_from` names: itself, or a hub id's snapshot. With download=False a hub id
    not in the cache gives None (the caller cannot see its config.json yet)."""
    if not is_hub_id(init_from):
        return Path(init_from).expanduser()
    return _snapshot(init_from, revision, download, where)


@functools.lru_cache(maxsize=16)
def _snapshot(repo_id: str, revision: str | None, download: bool, where: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise UserError(f"{where}: '{repo_id}' is a Hugging Face hub id, which needs huggingface_hub "
                        f"— pip install huggingface_hub, or point at a local folder") from None
    at = f" at revision '{revision}'" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=IMPORT_FILES,
                                        local_files_only=not download))
    except (LocalEntryNotFoundError, FileNotFoundError):
        if not download:
            return None
        raise UserError(f"{where}: '{repo_id}' is no local folder and is not in the Hugging Face cache{at}, and the "
                        f"hub cannot be reached (HF_HUB_OFFLINE=1 or no network) — download it where the hub is "
                        f"reachable (hf download {repo_id}) or point at a local folder") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: '{repo_id}' has no revision '{revision}' (model.init_revision)") from None
    except GatedRepoError:
        raise UserError(f"{where}: '{repo_id}' is gated — accept its license on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no local folder and no Hugging Face model '{repo_id}' (or it is private: "
                        f"set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise UserError(f"{where}: downloading '{repo_id}'{at} failed: {str(e).splitlines()[0]}") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: the hub model '{repo_id}'{at} has no config.json — not a transformers model")
    return folder
