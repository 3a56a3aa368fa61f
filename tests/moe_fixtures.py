"""pytest fixtures for the MoE regression tests, loaded with `pytest_plugins`.

Loaded as a plugin rather than imported, so each session fixture exists once
per process however many test modules use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import moe_layers
import pytest
import torch
from moe_layers import KERNEL_CASES, VARIANTS_ENV, KernelCase
from series_helpers import CPU_GELU_FIX, fixes_of

# The plugin test runs these modules again under pristine vLLM + the plugin,
# handing over the kernel probes of its own run (the CPU and kernels are the same).
PROBES_ENV = "VLLM_OVERLAY_KERNEL_PROBES"


@dataclass(frozen=True)
class Variant:
    name: str  # pristine, patched or plugin: see moe_layers.load_variant
    expect_bug: bool
    fixes: frozenset[str]  # the names of the patches it has (series_helpers.fixes_of)

    def lacks(self, patch: Path) -> bool:
        """Whether this variant must show the bug that `patch` fixes."""
        return patch.name not in self.fixes


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
        """The layer under test runs on this kernel path; record that it did. With the
        backport of vllm#42027 installed, an activation the compiled CPU kernels do not
        compute (Gemma4's GELUs) takes the torch path on every case."""
        selected = moe_layers.selected_path(experts)
        compiled = experts.activation.value in moe_layers.COMPILED_KERNEL_ACTIVATIONS
        if compiled or not installed_has(CPU_GELU_FIX):
            assert selected == self.selected
        else:
            assert selected.startswith("torch("), selected
        moe_layers.exercised.add(f"{selected} {str(self.dtype).removeprefix('torch.')}")


def _variants() -> list[Variant]:
    names = os.environ.get(VARIANTS_ENV, "pristine,patched").split(",")
    return [Variant(name, name == "pristine", frozenset(fixes_of(name))) for name in names]


def installed_has(patch: Path) -> bool:
    """Whether the installed vLLM modules (the fused-MoE layers, whatever a variant's model
    file) carry `patch`: the build's, or pristine's with what the plugin serves."""
    return patch.name in fixes_of(fixed_variant())


def fixed_variant() -> str:
    """What carries the fixes in this run: the patched build, or pristine vLLM + the plugin."""
    return _variants()[-1].name


@pytest.fixture(scope="module", params=_variants(), ids=lambda variant: variant.name)
def variant(request) -> Variant:
    """Every test runs on each variant: pristine 0.19.1 must show the bug; the
    build, and pristine vLLM with the plugin (a run of its own), must not."""
    return request.param


@pytest.fixture(scope="session")
def moe_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="session")
def vllm_distributed(moe_workdir):
    """vLLM's process groups, initialised once per process."""
    with moe_layers.distributed(moe_workdir):
        yield


_probes: dict[str, moe_layers.Probe] = {}


def kernel_probes() -> dict[str, moe_layers.Probe]:
    """Every kernel case, tried in fresh processes when a test first needs one."""
    if not _probes:
        handed = os.environ.get(PROBES_ENV)
        _probes.update(
            {name: moe_layers.Probe(**fields) for name, fields in json.loads(handed).items()}
            if handed
            else moe_layers.probe(KERNEL_CASES)
        )
    return _probes


def probed() -> dict[str, moe_layers.Probe]:
    """The probes this run made or was handed; none if no test needed them."""
    return _probes


def probes_json() -> str:
    """kernel_probes() for PROBES_ENV."""
    return json.dumps({name: dataclasses.asdict(probe) for name, probe in kernel_probes().items()})


def outcome(name: str) -> str:
    """What this CPU did with the kernel case, e.g. 'vLLM picks torch(linear)'."""
    case, probe = KERNEL_CASES[name], kernel_probes()[name]
    if probe.death:
        return f"{probe.selected or 'preparing the weights'} {probe.death}"
    return f"{'runs' if case.takes(probe.selected) else 'vLLM picks'} {probe.selected}"


def pytest_generate_tests(metafunc):
    """The MoE tests are collected for every kernel case; the `kernel` fixture
    probes the cases when a test first needs one."""
    if "kernel" in metafunc.fixturenames:
        metafunc.parametrize("kernel", list(KERNEL_CASES), indirect=True, scope="module")


@pytest.fixture(scope="module")
def kernel(request) -> Kernel:
    """A CPU MoE kernel case of vLLM 0.19.1, its env set; skipped, with what vLLM
    did instead, where this CPU does not run it."""
    name = request.param
    case, probe = KERNEL_CASES[name], kernel_probes()[name]
    if probe.death or not case.takes(probe.selected):
        pytest.skip(f"{name}: {outcome(name)} for {case.dtype} on this CPU ({moe_layers.cpu_isa()})")
    with pytest.MonkeyPatch.context() as env:
        for key, value in case.env:
            env.setenv(key, value)
        yield Kernel(name, case, probe.selected)
