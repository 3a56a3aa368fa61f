"""The maintainers' tools: refresh-patches (patches <-> overlays, the drift guard)
and upstream-status (is each patch still needed in a real vLLM release?)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from build_helpers import PINS, REPO, cache_dir, copy_repo, run_build
from build_helpers import run_script as run
from overlaytools import detect, patching, sources
from packaging.version import Version

PATCHES = patching.series()
GEMMA4, QWEN3, GELU = (p.name for p in PATCHES)
GEMMA4_FILE, QWEN3_FILE = patching.touched_files(PATCHES[:2])
VERIFY = ["--verify-only", "--offline", "--flavour", "cpu", "--arch", "x86_64"]


def snapshot(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "patches").iterdir())}


def pristine(rel: str) -> str:
    return sources.pinned_pristine(PINS, [rel], cache_dir(), offline=True)[rel].decode()


# ---- refresh-patches ------------------------------------------------------------------


def test_committed_patches_are_what_refresh_writes():
    """The drift guard CI runs: patches, overlays and the pristine pin agree."""
    result = run(REPO, "refresh-patches", "--check", "--offline")
    assert result.returncode == 0, result.stderr
    assert "3 patches are up to date" in result.stderr


def test_refresh_on_a_clean_checkout_changes_nothing(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    before = snapshot(repo)
    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 0, result.stderr
    assert snapshot(repo) == before
    assert result.stderr.count("unchanged patches/") == 3


def test_overlay_edit_gives_the_matching_patch(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    before = snapshot(repo)
    overlay = repo / "overlay" / QWEN3_FILE
    edited = overlay.read_text().replace(
        "        if self.experts.is_internal_router:\n",
        "        # Edited by a maintainer.\n        if self.experts.is_internal_router:\n",
    )  # fmt: skip
    overlay.write_text(edited)

    # Until the patches are refreshed, both guards fail and say what to run.
    check = run(repo, "refresh-patches", "--check", "--offline")
    assert check.returncode == 1
    assert "run scripts/refresh-patches" in check.stderr.splitlines()[0]
    assert "+        # Edited by a maintainer." in check.stderr
    build = run_build(*VERIFY, repo=repo)
    assert build.returncode == 1 and "run scripts/refresh-patches" in build.stderr

    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 0, result.stderr
    after = snapshot(repo)
    assert after.keys() == before.keys()
    assert after[GEMMA4] == before[GEMMA4] and after["series"] == before["series"]
    new = after[QWEN3].decode()
    assert new != before[QWEN3].decode()
    assert "+        # Edited by a maintainer.\n" in new
    assert header_and_message(new) == header_and_message(before[QWEN3].decode())
    # The refreshed patch turns pristine into exactly the edited overlay.
    rebuilt = patching.apply({QWEN3_FILE: pristine(QWEN3_FILE).encode()},
                             [repo / "patches" / QWEN3])  # fmt: skip
    assert rebuilt[QWEN3_FILE].decode() == edited
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 0
    assert run_build(*VERIFY, repo=repo).returncode == 0


def test_patch_edit_rewrites_the_overlay(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / GEMMA4
    old = "+        # capturing the Parameter, so a replaced Parameter or a tensor\n"
    assert old in patch.read_text()
    patch.write_text(patch.read_text().replace(old, old.replace("capturing", "caching")))
    assert run_build(*VERIFY, repo=repo).returncode == 1

    result = run(repo, "refresh-patches", "--overlays", "--offline")
    assert result.returncode == 0, result.stderr
    assert f"updated overlay/{GEMMA4_FILE}" in result.stderr
    assert f"unchanged overlay/{QWEN3_FILE}" in result.stderr
    assert "# caching the Parameter" in (repo / "overlay" / GEMMA4_FILE).read_text()
    assert run_build(*VERIFY, repo=repo).returncode == 0
    # The hand edit left a stale blob id in the patch's index line; a refresh fixes it.
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 1
    assert run(repo, "refresh-patches", "--offline").returncode == 0
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 0


def test_overlay_equal_to_pristine_is_refused(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "overlay" / QWEN3_FILE).write_text(pristine(QWEN3_FILE))
    before = snapshot(repo)
    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 1
    assert f"{QWEN3}: overlay/{QWEN3_FILE} equals the pristine file" in result.stderr
    assert snapshot(repo) == before


def header_and_message(patch: str) -> str:
    """Everything before the diffstat: From, Date, Subject and the provenance."""
    return patch.split("\n---\n", 1)[0]


# ---- upstream-status: the detectors on known code ----------------------------------------


@pytest.mark.parametrize("patch", PATCHES, ids=["gemma4", "qwen3", "gemma4-gelu"])
def test_detectors_see_the_bug_in_pristine_and_the_fix_in_the_overlay(patch):
    """Each patch's Origin names the upstream fix whose detector judges it."""
    ((rel, detector),) = detect.for_origin(patching.origin(patch.read_text()))
    assert rel in patching.touched_files([patch])
    assert detector(pristine(rel)).state == detect.BUGGY
    assert detector((REPO / "overlay" / rel).read_text()).state == detect.FIXED


# ---- upstream-status against the real releases -------------------------------------------

LINE = re.compile(r"^  (\S+\.patch)\s+(applies|fixed|conflicts)\s+(.*)$")


def parse_status(stdout: str) -> dict[str, dict]:
    """{version: {"wheel": ..., "verdicts": {patch: (state, reason)}, "summary": ...}}"""
    releases, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("vLLM "):
            version, _, rest = line[len("vLLM "):].partition(" ")
            current = releases[version] = {"wheel": rest, "verdicts": {}, "summary": ""}
        elif match := LINE.match(line):
            current["verdicts"][match[1]] = (match[2], match[3])
        elif line.startswith("  => "):
            current["summary"] = line[len("  => "):]
    return releases


@pytest.fixture(scope="module")
def real_releases() -> dict[str, dict]:
    versions = ["0.19.1", "0.20.0", "0.20.2", "0.21.0", "0.22.0", "latest"]
    result = run(REPO, "upstream-status", "--arch", "x86_64", *versions, timeout=1800)
    assert result.returncode == 0, result.stderr
    return parse_status(result.stdout)


def test_pin_needs_every_patch(real_releases):
    pin = real_releases["0.19.1"]
    assert "sha256 checked against the lock" in pin["wheel"]
    assert {p: s for p, (s, _) in pin["verdicts"].items()} == {
        GEMMA4: "applies", QWEN3: "applies", GELU: "applies"}  # fmt: skip
    assert pin["summary"] == "the overlay is still needed on 0.19.1"


@pytest.mark.parametrize("version", ["0.20.0", "0.20.2", "0.21.0"])
def test_qwen3_fixed_but_not_gemma4(real_releases, version):
    release = real_releases[version]
    assert "sha256 checked against the index" in release["wheel"]
    assert release["verdicts"][QWEN3][0] == "fixed"
    state, reason = release["verdicts"][GEMMA4]
    # The bug is still there, and the 0.19.1 backport does not fit the new code.
    assert state == "conflicts"
    assert "captured from its enclosing scope" in reason and "forward-port" in reason


@pytest.mark.parametrize("version, state", [("0.20.0", "applies"), ("0.20.2", "applies"),
                                            ("0.21.0", "fixed")])  # fmt: skip
def test_gelu_fixed_from_0_21_0(real_releases, version, state):
    """0.20.x still builds Gemma4's experts with exact GELU; 0.21.0 moved the Triton and
    Marlin experts into experts/, so only the detector can see the fix there."""
    verdict, reason = real_releases[version]["verdicts"][GELU]
    assert verdict == state
    assert ("activation='gelu_tanh'" if state == "fixed" else "activation='gelu' (exact GELU)") in reason


def test_both_fixed_from_0_22_0(real_releases):
    newer = {v: r for v, r in real_releases.items() if Version(v) >= Version("0.22.0")}
    assert "0.22.0" in newer and len(newer) == 2  # 0.22.0 and the newest release
    for version, release in newer.items():
        assert {s for s, _ in release["verdicts"].values()} == {"fixed"}, version
        assert release["summary"] == f"every fix is upstream: on {version} the overlay is no longer needed"


def test_default_is_the_pin_and_the_newest_release(real_releases):
    result = run(REPO, "upstream-status", "--arch", "x86_64")
    assert result.returncode == 0, result.stderr
    releases = parse_status(result.stdout)
    assert list(releases) == ["0.19.1", max(real_releases, key=Version)]


def test_patch_that_no_longer_applies_needs_a_forward_port(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / QWEN3
    context = "         if self.is_sequence_parallel:\n             hidden_states = sequence_parallel_chunk"
    patch.write_text(patch.read_text().replace(context, context.replace("is_sequence", "is_seq")))
    result = run(repo, "upstream-status", "--arch", "x86_64", "0.19.1")
    assert result.returncode == 0, result.stderr
    release = parse_status(result.stdout)["0.19.1"]
    assert release["verdicts"][GEMMA4][0] == "applies"
    state, reason = release["verdicts"][QWEN3]
    assert state == "conflicts"
    assert "hunk '@@ -232,11 +232,19 @@" in reason and reason.endswith("forward-port it")
    assert release["summary"] == "the overlay needs a forward-port before it can patch 0.19.1"


@pytest.mark.parametrize("arg, message", [
    ("0.19.x", "'0.19.x' is not a version"),
    ("99.0.0", "no x86_64 wheel of vllm==99.0.0 on the index"),
])  # fmt: skip
def test_status_rejects_bad_versions(arg, message):
    result = run(REPO, "upstream-status", "--arch", "x86_64", arg)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"upstream-status: error: {message}")
