"""pytest fixtures for the MoE regression tests, loaded with `pytest_plugins`.

Loaded as a plugin rather than imported, so each session fixture exists once
per process however many test modules use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import moe_layers
from moe_layers import KERNEL_CASES, KernelCase

# The plugin test runs these modules again under pristine vLLM + the plugin.
VARIANTS_ENV = "VLLM_OVERLAY_MOE_VARIANTS"


@dataclass(frozen=True)
class Variant:
    name: str  # a moe_layers.VARIANTS entry
    expect_bug: bool


@dataclass(frozen=True)
class Kernel:
    """A kernel case this CPU runs, and the path vLLM picked for it here."""

    name: str
    case: KernelCase
    selected: str  # e.g. "torch(linear)"

    @property
    def dtype(self) -> torch.dtype:
        return self.case.dtype

    def check(self, experts: torch.nn.Module) -> None:
        """The layer under test runs on this kernel path; record that it did."""
        assert moe_layers.selected_path(experts) == self.selected
        moe_layers.exercised.add(f"{self.selected} {str(self.dtype).removeprefix('torch.')}")


def _variants() -> list[Variant]:
    names = os.environ.get(VARIANTS_ENV, "pristine,patched").split(",")
    return [Variant(name, expect_bug=name == "pristine") for name in names]


def fixed_variant() -> str:
    """What carries the fixes in this run: the patched build, or pristine vLLM + the plugin."""
    return _variants()[-1].name


@pytest.fixture(scope="module", params=_variants(), ids=lambda variant: variant.name)
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


_selection: dict[str, tuple[str, str]] = {}  # case -> (path vLLM picked, reason to skip)


def _select(name: str, case: KernelCase, workdir: Path) -> tuple[str, str]:
    """What vLLM picks for the case on this CPU, and why the case cannot run here ('' if it can).

    bfloat16 cases are tried in a subprocess first: their kernels may abort the process.
    """
    isa = moe_layers.cpu_isa()
    if case.dtype != torch.float32:
        selected, crash = moe_layers.probe(case)
        if crash:
            return selected, f"{name}: {selected or 'preparing the weights'} {crash} on this CPU ({isa})"
    hf_config = moe_layers.qwen3_config(moe_layers.SHARED_INTERMEDIATE,
                                        moe_intermediate_size=case.moe_intermediate)  # fmt: skip
    config = moe_layers.vllm_config(hf_config, workdir, case.dtype)
    module = moe_layers.load_variant(fixed_variant(), "qwen3_moe", workdir)
    block, _ = moe_layers.build_qwen3_block(module, config, seed=0)
    selected = moe_layers.selected_path(block.experts)
    if not case.takes(selected):
        return selected, f"{name}: vLLM picks {selected} for {case.dtype} on this CPU ({isa})"
    return selected, ""


@pytest.fixture(scope="module", params=list(KERNEL_CASES))
def kernel(request, moe_workdir, vllm_distributed) -> Kernel:
    """Each CPU MoE kernel path of vLLM 0.19.1, where this CPU can run it.

    Skipped, with the reason, where vLLM picks another path for the case's
    setup on this CPU, or where the kernel kills the process.
    """
    name, case = request.param, KERNEL_CASES[request.param]
    with pytest.MonkeyPatch.context() as env:
        for key, value in case.env:
            env.setenv(key, value)
        if name not in _selection:
            _selection[name] = _select(name, case, moe_workdir)
        selected, skip = _selection[name]
        if skip:
            pytest.skip(skip)
        yield Kernel(name, case, selected)
