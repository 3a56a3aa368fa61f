"""The repository's Python is formatted and linted as ruff.toml says (overlay/ is
upstream's code and keeps upstream's style)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.fast
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
    # The tools environment's Python: tests/run exports it as PYTHON for the full run.
    python = os.environ.get("PYTHON", sys.executable)
    result = subprocess.run([python, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
