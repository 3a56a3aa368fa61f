"""What the tests know of the patch series, read from patches/series and the
patches themselves: no test names a patch, a patched file or how many there are."""

from __future__ import annotations

import re
from pathlib import Path

from build_helpers import REPO
from overlaytools import patching, plugin_wheel

PATCHES = patching.series(REPO / "patches")
FILES = patching.touched_files(PATCHES)  # every file the series changes or adds
ADDED = patching.added_files(PATCHES)  # files the release does not have
CHANGED = [rel for rel in FILES if rel not in ADDED]  # the release's files the series changes
# The provenance a commit made by a test carries, in the form every patch must have.
TEST_PROVENANCE = (
    "Origin: backport, https://example.invalid/vllm/pull/1\n"
    "Bug: https://example.invalid/vllm/issues/1\n"
    "Applied-Upstream: 99.0.0\n"
    "Backport: a test commit, made by the test suite to exercise the tools; upstream has no such change\n"
)


def files_of(patch: Path) -> list[str]:
    return patching.touched_files([patch])


def module_name(path: str) -> str:
    """vllm/a/b.py -> vllm.a.b: the module an import of the file gives."""
    return path.removesuffix(".py").replace("/", ".")


MODULES = {module_name(rel): rel for rel in FILES}


def plugin_carries(patch: Path) -> bool:
    """The rule (plugin_wheel.SERVABLE): the plugin carries a patch only if every file it
    changes or adds is one that vLLM imports after its general plugins."""
    return all(rel.startswith(plugin_wheel.SERVABLE) for rel in files_of(patch))


CARRIED = [p for p in PATCHES if plugin_carries(p)]  # what the plugin wheel must carry
NOT_CARRIED = [p for p in PATCHES if not plugin_carries(p)]
SERVED = patching.touched_files(CARRIED)  # the files the plugin serves
SERVED_MODULES = {module_name(rel): rel for rel in SERVED}


# The patch that gives Gemma4's experts tanh GELU: the one that changes the fused-MoE
# activation module.
(GELU_FIX,) = [p for p in PATCHES if "vllm/model_executor/layers/fused_moe/activation.py" in files_of(p)]
# The patch that lets the CPU MoE backend run the GELU activations: the one that
# changes its activation table.
(CPU_GELU_FIX,) = [
    p for p in PATCHES if "vllm/model_executor/layers/fused_moe/cpu_fused_moe.py" in files_of(p)
]


def fixes_of(variant: str) -> set[str]:
    """The names of the patches whose fixes a test variant has: none on pristine 0.19.1,
    the whole series on the patched build, and with pristine + the plugin those that the
    plugin imported in this process lists as carried."""
    if variant == "pristine":
        return set()
    if variant == "patched":
        return {p.name for p in PATCHES}
    import vllm_moe_overlay

    return {p["name"] for p in vllm_moe_overlay.manifest()["carried"]}


def provenance(patch: Path) -> dict[str, str]:
    """The `Field: value` lines of a patch's message."""
    message = patch.read_text().split("\n---\n", 1)[0]
    return dict(re.findall(r"^([A-Z][\w-]+): (.+)$", message, re.M))
