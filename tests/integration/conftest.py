"""Integration-test defaults: DeepSpeed's compiled ops are cached across runs (.ci/run exports the same folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_cache():
    """DeepSpeed builds its C++ ops (shm comm, cpu_adam) on first use, ~1 min each: build them once per machine."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bigtrain-torch-extensions"))
    yield
