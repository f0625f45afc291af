"""Integration-test defaults: DeepSpeed's compiled ops are cached across runs (.ci/run exports the same folder)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest


def extensions_dir() -> Path:
    """Where DeepSpeed's compiled ops are cached for this Python environment. The build files name the
    environment's include paths, so a cache shared by two venvs is rebuilt (~1 min per op) whenever they alternate."""
    return Path.home() / ".cache" / "bigtrain-torch-extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_cache():
    """DeepSpeed builds its C++ ops (shm comm, cpu_adam) on first use, ~1 min each: build them once per environment."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    yield
