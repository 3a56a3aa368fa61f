"""The maintainers' tools: the drift guard (scripts/patch-queue check) and
upstream-status (is each patch still needed in a real vLLM release?)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from build_helpers import LOCK, REPO, cache_dir, copy_repo, run_build
from build_helpers import run_script as run
from overlaytools import detect, patching, sources
from packaging.version import Version
from series_helpers import PATCHES, applied_upstream, files_of, provenance

# The guards need only some patch and a file it changes.
EDITED = PATCHES[0]
EDITED_FILE = files_of(EDITED)[0]
# Broken, the last patch leaves the patches before it applying.
LAST = PATCHES[-1]
VERIFY = ["--verify-only", "--offline", "--flavour", "cpu", "--arch", "x86_64"]


def snapshot(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "patches").iterdir())}


def pristine(rel: str) -> str:
    return sources.pinned_pristine(LOCK, [rel], cache_dir(), offline=True)[rel].decode()


# ---- the drift guard: scripts/patch-queue check ---------------------------------------


def test_committed_patches_and_overlay_pass_the_drift_guard():
    """The drift guard CI runs: patches, overlays and the pristine pin agree."""
    result = run(REPO, "patch-queue", "check", "--offline")
    assert result.returncode == 0, result.stderr
    assert f"{len(PATCHES)} patches are in export form and overlay/ is pristine + patches" in result.stderr


def test_overlay_edit_fails_both_guards(tmp_path):
    """overlay/ is generated: an edit there is refused, pointing at the patch queue."""
    repo = copy_repo(tmp_path / "repo")
    before = snapshot(repo)
    overlay = repo / "overlay" / EDITED_FILE
    overlay.write_text(overlay.read_text() + "# Edited by a maintainer.\n")
    check = run(repo, "patch-queue", "check", "--offline")
    assert check.returncode == 1
    assert "make changes in the patch queue (import, commit, export)" in check.stderr.splitlines()[0]
    assert "+# Edited by a maintainer." in check.stderr
    build = run_build(*VERIFY, repo=repo)
    assert build.returncode == 1 and "scripts/patch-queue" in build.stderr
    assert snapshot(repo) == before  # the guards write nothing


def test_hand_edited_patch_fails_both_guards(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / EDITED.name
    # Append a comment to the first line the patch adds.
    old = re.search(r"^\+(?!\+\+ ).*$", patch.read_text(), re.M).group(0)
    patch.write_text(patch.read_text().replace(old + "\n", old + "  # edited by hand\n", 1))
    assert run_build(*VERIFY, repo=repo).returncode == 1
    check = run(repo, "patch-queue", "check", "--offline")
    assert check.returncode == 1 and "overlay differs from pristine + patches" in check.stderr


# ---- upstream-status: the detectors on known code ----------------------------------------


DETECTED = [
    (patch, paths[0], detector)  # the file the fix changes; later paths are where it moved
    for patch in PATCHES
    for paths, detector in detect.for_origin(patching.origin(patch.read_text()))
]


@pytest.mark.parametrize("patch, rel, detector", DETECTED, ids=[p.name[:4] for p, _, _ in DETECTED])
def test_detectors_see_the_bug_in_pristine_and_the_fix_in_the_overlay(patch, rel, detector):
    """A patch's Origin names the upstream fix whose detector judges it."""
    assert rel in files_of(patch)
    assert detector(pristine(rel)).state == detect.BUGGY
    assert detector((REPO / "overlay" / rel).read_text()).state == detect.FIXED


# ---- upstream-status against the real releases -------------------------------------------

LINE = re.compile(r"^  (\S+\.patch)\s+(applies|fixed|conflicts)\s+(.*)$")


def parse_status(stdout: str) -> dict[str, dict]:
    """{version: {"wheel": ..., "verdicts": {patch: (state, reason)}, "summary": ...}}"""
    releases, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("vLLM "):
            version, _, rest = line[len("vLLM ") :].partition(" ")
            current = releases[version] = {"wheel": rest, "verdicts": {}, "summary": ""}
        elif match := LINE.match(line):
            current["verdicts"][match[1]] = (match[2], match[3])
        elif line.startswith("  => "):
            current["summary"] = line[len("  => ") :]
    return releases


# The releases read: the pin, those before and after each fix, and the newest.
RELEASES = ["0.19.1", "0.20.0", "0.20.2", "0.21.0", "0.22.0", "0.23.0", "latest"]


def fixed_from(patch: Path) -> Version | None:
    """The first release with the patch's fix; None if no release has it yet."""
    return applied_upstream(provenance(patch)["Applied-Upstream"])


@pytest.fixture(scope="module")
def real_releases() -> dict[str, dict]:
    result = run(REPO, "upstream-status", "--arch", "x86_64", *RELEASES, timeout=1800)
    assert result.returncode == 0, result.stderr
    return parse_status(result.stdout)


@pytest.mark.network
def test_pin_needs_every_patch(real_releases):
    pin = real_releases[LOCK.pin]
    assert "sha256 checked against the lock" in pin["wheel"]
    assert pin["verdicts"] == {p.name: ("applies", pin["verdicts"][p.name][1]) for p in PATCHES}
    assert pin["summary"] == f"the overlay is still needed on {LOCK.pin}"


@pytest.mark.network
@pytest.mark.parametrize("patch, rel, detector", DETECTED, ids=[p.name[:4] for p, _, _ in DETECTED])
def test_each_fix_is_found_from_the_release_its_provenance_names(real_releases, patch, rel, detector):
    """Fixed from its Applied-Upstream release on; before it the bug is found, and the
    patch either applies or needs a forward-port."""
    for version, release in real_releases.items():
        state, reason = release["verdicts"][patch.name]
        first = fixed_from(patch)
        if first is not None and Version(version) >= first:
            assert state == "fixed", (version, reason)
        else:
            assert state == "applies" or (state == "conflicts" and reason.endswith("forward-port it")), (
                version,
                reason,
            )
    index = [r["wheel"] for v, r in real_releases.items() if v != LOCK.pin]
    assert index and all("sha256 checked against the index" in w for w in index)


@pytest.mark.network
def test_overlay_no_longer_needed_once_every_fix_is_released(real_releases):
    firsts = [fixed_from(p) for p in PATCHES]
    if None in firsts:  # a fix no release has: every release read still needs the overlay
        for version, release in real_releases.items():
            assert not release["summary"].startswith("every fix is upstream"), version
        return
    last = max(firsts)
    newer = {v: r for v, r in real_releases.items() if Version(v) >= last}
    assert len(newer) >= 2  # the last fix's release and the newest release
    for version, release in newer.items():
        assert {s for s, _ in release["verdicts"].values()} == {"fixed"}, version
        assert release["summary"] == f"every fix is upstream: on {version} the overlay is no longer needed"


@pytest.mark.network
def test_default_is_the_pin_and_the_newest_release(real_releases):
    result = run(REPO, "upstream-status", "--arch", "x86_64")
    assert result.returncode == 0, result.stderr
    releases = parse_status(result.stdout)
    assert list(releases) == [LOCK.pin, max(real_releases, key=Version)]


def test_patch_that_no_longer_applies_needs_a_forward_port(tmp_path):
    """A context line of the patch's first hunk differs from the release: that hunk is named."""
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / LAST.name
    hunk = re.search(
        r"^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@.*)\n((?:[-+].*\n)*) (.*)$", patch.read_text(), re.M
    )
    header, context = hunk.group(1), hunk.group(3)
    text = patch.read_text()
    patch.write_text(text[: hunk.start(3)] + context + "  # not in the release" + text[hunk.end(3) :])
    result = run(repo, "upstream-status", "--arch", "x86_64", LOCK.pin)
    assert result.returncode == 0, result.stderr
    release = parse_status(result.stdout)[LOCK.pin]
    state, reason = release["verdicts"].pop(LAST.name)
    assert state == "conflicts"
    assert f"hunk '{header}'" in reason
    assert reason.endswith(
        "forward-port it" if detect.for_origin(patching.origin(text)) else "review by hand"
    )
    assert {s for s, _ in release["verdicts"].values()} <= {"applies"}
    assert release["summary"] == f"the overlay needs a forward-port before it can patch {LOCK.pin}"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("0.19.x", "'0.19.x' is not a version"),
        pytest.param("99.0.0", "no x86_64 wheel of vllm==99.0.0 on the index", marks=pytest.mark.network),
    ],
)
def test_status_rejects_bad_versions(arg, message):
    result = run(REPO, "upstream-status", "--arch", "x86_64", arg)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"upstream-status: error: {message}")
