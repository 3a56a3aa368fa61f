"""pytest fixtures for the MoE regression tests, loaded with `pytest_plugins`.

Loaded as a plugin rather than imported, so each session fixture exists once
per process however many test modules use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import moe_layers


@dataclass(frozen=True)
class Variant:
    name: str  # a moe_layers.VARIANTS entry
    expect_bug: bool


@pytest.fixture(scope="module", params=[Variant("pristine", True), Variant("patched", False)],
                ids=lambda variant: variant.name)  # fmt: skip
def variant(request) -> Variant:
    """Every test runs on both: pristine 0.19.1 must show the bug, the build must not."""
    return request.param


@pytest.fixture(scope="session")
def moe_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="session")
def vllm_distributed(moe_workdir):
    """vLLM's process groups, initialised once per process."""
    with moe_layers.distributed(moe_workdir):
        yield
