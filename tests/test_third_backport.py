"""The suite follows the series: a copy of the repository gets a third backport the
way MAINTAINING.md says (patch queue, provenance, export, label, build), one that
changes qwen3_moe.py again and adds a module vLLM does not have, and the
patch-level tests pass there, run by pytest in the copy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from build_helpers import LOCK, copy_checkout, git, run_build, run_script
from overlaytools import patching
from series_helpers import PATCHES, TEST_PROVENANCE

CHANGED_AGAIN = "vllm/model_executor/models/qwen3_moe.py"
NEW_MODULE = "vllm/model_executor/models/overlay_probe.py"
# The tests that need only the repository and the build cache: the patches, the
# maintainers' tools, the built wheels, the plugin wheel and its loader in vLLM.
PATCH_LEVEL = [
    "tests/test_patch_hygiene.py",
    "tests/test_maintenance.py",
    "tests/test_build_wheels.py",
    "tests/test_plugin.py",
]


def add_backport(repo: Path) -> None:
    """MAINTAINING.md's "Add a backport", with a change of our own for the PR's."""
    result = run_script(repo, "patch-queue", "import", "--offline")
    assert result.returncode == 0, result.stderr
    queue = repo / ".patch-queue"
    with open(queue / CHANGED_AGAIN, "a") as module:
        module.write("\n\n# Changed again by the third backport.\n")
    (queue / NEW_MODULE).write_text('"""A module that vLLM 0.19.1 does not have."""\n\nADDED = True\n')
    git(queue, "add", CHANGED_AGAIN, NEW_MODULE)
    git(
        queue,
        "commit",
        "-q",
        "-m",
        f"[Misc] Overlay probe: a module of our own\n\nAdds a module.\n\n{TEST_PROVENANCE}",
    )
    result = run_script(repo, "patch-queue", "export", "--offline")
    assert result.returncode == 0, result.stderr
    assert f"added overlay/{NEW_MODULE}" in result.stderr
    lock = json.loads((repo / "upstream.lock.json").read_text())
    lock["label"] = re.sub(r"\d+$", lambda m: str(int(m[0]) + 1), LOCK.label)  # moefix.1 -> moefix.2
    assert lock["label"] != LOCK.label
    (repo / "upstream.lock.json").write_text(json.dumps(lock, indent=1) + "\n")


def test_patch_level_tests_pass_with_a_third_backport_that_adds_a_module(tmp_path):
    repo = copy_checkout(tmp_path / "repo")
    add_backport(repo)
    series = patching.series_names((repo / "patches" / "series").read_text())
    assert series[:-1] == [p.name for p in PATCHES] and series[-1].startswith(f"{len(PATCHES) + 1:04d}-")
    assert (repo / "overlay" / NEW_MODULE).is_file()

    # Every wheel, so the built-wheel tests see the added module in each flavour.
    build = run_build("--offline", repo=repo)
    assert build.returncode == 0, build.stderr

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *PATCH_LEVEL,
            "-m",
            "not installed and not network",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in summary and not re.search(r"failed|error|skipped", summary), summary
    # The tests saw the third patch and the added module.
    for test in (
        "test_maintenance.py::test_committed_patches_and_overlay_pass_the_drift_guard",
        "test_plugin.py::test_other_file_changes_nothing_and_warns_with_both_hashes[added]",
        "test_plugin.py::test_applies_on_pristine_vllm_when_vllm_plugins_names_it",
    ):
        assert f"PASSED tests/{test}" in result.stdout, test
