"""What the tests know of the patch series, read from patches/series and the
patches themselves: no test names a patch, a patched file or how many there are."""

from __future__ import annotations

import re
from pathlib import Path

from build_helpers import REPO
from overlaytools import patching
from packaging.version import InvalidVersion, Version

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


# The patch that gives Gemma4's experts tanh GELU: the one that changes the fused-MoE
# activation module.
(GELU_FIX,) = [p for p in PATCHES if "vllm/model_executor/layers/fused_moe/activation.py" in files_of(p)]
# The patch that lets the CPU MoE backend run the GELU activations: the one that
# changes its activation table.
(CPU_GELU_FIX,) = [
    p for p in PATCHES if "vllm/model_executor/layers/fused_moe/cpu_fused_moe.py" in files_of(p)
]


def fixes_of(variant: str) -> set[str]:
    """The names of the patches whose fixes a test variant has: none on pristine 0.19.1
    (with or without the plugin turned off), the whole series on the patched build, and
    with pristine + the plugin those that the plugin imported in this process lists as
    carried (the whole series: test_plugin.py checks it)."""
    if variant in ("pristine", "plugin-off"):  # plugin-off: VLLM_PLUGINS leaves it out
        return set()
    if variant == "patched":
        return {p.name for p in PATCHES}
    import vllm_moe_overlay

    return {p["name"] for p in vllm_moe_overlay.manifest()["carried"]}


def provenance(patch: Path) -> dict[str, str]:
    """The `Field: value` lines of a patch's message."""
    message = patch.read_text().split("\n---\n", 1)[0]
    return dict(re.findall(r"^([A-Z][\w-]+): (.+)$", message, re.M))


def fix_of(pull_request: str) -> Path:
    """The patch whose Origin names the upstream pull request (its URL)."""
    (patch,) = [p for p in PATCHES if patching.origin(p.read_text()).endswith(", " + pull_request)]
    return patch


UNRELEASED = re.compile(r"unreleased, https://\S+")


def applied_upstream(value: str) -> Version | None:
    """An Applied-Upstream value: the first release with the fix, or None for a fix
    merged upstream that no release has yet, written 'unreleased, <merge commit URL>'.
    Raises ValueError for anything else."""
    if UNRELEASED.fullmatch(value):
        return None
    try:
        return Version(value)
    except InvalidVersion:
        raise ValueError(f"Applied-Upstream {value!r} is neither a release nor 'unreleased, <URL>'") from None
