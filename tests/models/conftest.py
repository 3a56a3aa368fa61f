"""gemma4-moe-tiny and its transformers reference, shared by the modules here.

Imports are made in the fixtures: the fast lane reads this file without torch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from build_helpers import REPO


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """tests/make-tiny-checkpoints' gemma4-moe-tiny (seed 0)."""
    import tiny_gemma4
    from serve_helpers import VENV

    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(
        [str(VENV / "bin/python"), str(REPO / "tests/make-tiny-checkpoints"), str(out)],
        check=True,
        capture_output=True,
    )
    return out / tiny_gemma4.NAME


@pytest.fixture(scope="session")
def reference(checkpoint):
    """transformers' Gemma4ForCausalLM of the checkpoint, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
