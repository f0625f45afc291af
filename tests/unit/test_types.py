"""The package type-checks: `python -m mypy` with pyproject.toml's [tool.mypy] settings (the package and the
launcher) finds no error. A wrong annotation or a None the code does not handle fails here, not in a run."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_passes():
    pytest.importorskip("mypy")  # the test extra installs it (pyproject.toml)
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
