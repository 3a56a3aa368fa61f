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
    # The build environment's Python with the test tools (tests/run exports both).
    python = os.environ.get("PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": os.environ.get("VLLM_OVERLAY_TEST_TOOLS", "")}
    result = subprocess.run(
        [python, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
