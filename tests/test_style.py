"""The code base stays lint-clean and type-clean (ruff, mypy on the package)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_is_clean():
    done = run("ruff", "check", "src", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_is_clean_on_the_package():
    pytest.importorskip("mypy")
    done = run(sys.executable, "-m", "mypy", "src/kdgqa")
    assert done.returncode == 0, done.stdout[-4000:]
