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
from series_helpers import FILES, PATCHES, files_of, patch_alone_on_its_files, provenance

# A patch that a refresh can rebuild from the overlay alone, and its first file.
ALONE = patch_alone_on_its_files()
ALONE_FILE = files_of(ALONE)[0]
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
    assert f"{len(PATCHES)} patches are up to date" in result.stderr


def test_refresh_on_a_clean_checkout_changes_nothing(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    before = snapshot(repo)
    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 0, result.stderr
    assert snapshot(repo) == before
    assert result.stderr.count("unchanged patches/") == len(PATCHES)


def test_overlay_edit_gives_the_matching_patch(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    before = snapshot(repo)
    overlay = repo / "overlay" / ALONE_FILE
    edited = overlay.read_text() + "# Edited by a maintainer.\n"
    overlay.write_text(edited)

    # Until the patches are refreshed, both guards fail and say what to run.
    check = run(repo, "refresh-patches", "--check", "--offline")
    assert check.returncode == 1
    assert "run scripts/refresh-patches" in check.stderr.splitlines()[0]
    assert "+# Edited by a maintainer." in check.stderr
    build = run_build(*VERIFY, repo=repo)
    assert build.returncode == 1 and "run scripts/refresh-patches" in build.stderr

    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 0, result.stderr
    after = snapshot(repo)
    assert after.keys() == before.keys()
    assert {n: d for n, d in after.items() if n != ALONE.name} == {
        n: d for n, d in before.items() if n != ALONE.name}  # fmt: skip
    new = after[ALONE.name].decode()
    assert new != before[ALONE.name].decode()
    assert "+# Edited by a maintainer.\n" in new
    assert header_and_message(new) == header_and_message(before[ALONE.name].decode())
    # The refreshed patch turns pristine into exactly the edited overlay.
    rebuilt = patching.apply({rel: pristine(rel).encode() for rel in files_of(ALONE)},
                             [repo / "patches" / ALONE.name])  # fmt: skip
    assert rebuilt[ALONE_FILE].decode() == edited
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 0
    assert run_build(*VERIFY, repo=repo).returncode == 0


def test_patch_edit_rewrites_the_overlay(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / ALONE.name
    # Append a comment to the first line the patch adds.
    old = re.search(r"^\+(?!\+\+ ).*$", patch.read_text(), re.M).group(0)
    patch.write_text(patch.read_text().replace(old + "\n", old + "  # edited by hand\n", 1))
    assert run_build(*VERIFY, repo=repo).returncode == 1

    result = run(repo, "refresh-patches", "--overlays", "--offline")
    assert result.returncode == 0, result.stderr
    for rel in FILES:
        assert f"{'updated' if rel in files_of(ALONE) else 'unchanged'} overlay/{rel}" in result.stderr
    assert old[1:] + "  # edited by hand\n" in (repo / "overlay" / ALONE_FILE).read_text()
    assert run_build(*VERIFY, repo=repo).returncode == 0
    # The hand edit left a stale blob id in the patch's index line; a refresh fixes it.
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 1
    assert run(repo, "refresh-patches", "--offline").returncode == 0
    assert run(repo, "refresh-patches", "--check", "--offline").returncode == 0


def test_overlay_equal_to_pristine_is_refused(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    for rel in files_of(ALONE):
        (repo / "overlay" / rel).write_text(pristine(rel))
    before = snapshot(repo)
    result = run(repo, "refresh-patches", "--offline")
    assert result.returncode == 1
    overlays = ", ".join(f"overlay/{rel}" for rel in files_of(ALONE))
    assert f"{ALONE.name}: {overlays} equals the pristine file" in result.stderr
    assert snapshot(repo) == before


def header_and_message(patch: str) -> str:
    """Everything before the diffstat: From, Date, Subject and the provenance."""
    return patch.split("\n---\n", 1)[0]


# ---- upstream-status: the detectors on known code ----------------------------------------


DETECTED = [(patch, rel, detector) for patch in PATCHES
            for rel, detector in detect.for_origin(patching.origin(patch.read_text()))]  # fmt: skip


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
            version, _, rest = line[len("vLLM "):].partition(" ")
            current = releases[version] = {"wheel": rest, "verdicts": {}, "summary": ""}
        elif match := LINE.match(line):
            current["verdicts"][match[1]] = (match[2], match[3])
        elif line.startswith("  => "):
            current["summary"] = line[len("  => "):]
    return releases


# The releases read: the pin, those before and after each fix, and the newest.
RELEASES = ["0.19.1", "0.20.0", "0.20.2", "0.21.0", "0.22.0", "latest"]


def applied_upstream(patch: Path) -> Version:
    return Version(provenance(patch)["Applied-Upstream"])


@pytest.fixture(scope="module")
def real_releases() -> dict[str, dict]:
    result = run(REPO, "upstream-status", "--arch", "x86_64", *RELEASES, timeout=1800)
    assert result.returncode == 0, result.stderr
    return parse_status(result.stdout)


@pytest.mark.network
def test_pin_needs_every_patch(real_releases):
    pin = real_releases[PINS.pin]
    assert "sha256 checked against the lock" in pin["wheel"]
    assert pin["verdicts"] == {p.name: ("applies", pin["verdicts"][p.name][1]) for p in PATCHES}
    assert pin["summary"] == f"the overlay is still needed on {PINS.pin}"


@pytest.mark.network
@pytest.mark.parametrize("patch, rel, detector", DETECTED, ids=[p.name[:4] for p, _, _ in DETECTED])
def test_each_fix_is_found_from_the_release_its_provenance_names(real_releases, patch, rel, detector):
    """Fixed from its Applied-Upstream release on; before it the bug is found, and the
    patch either applies or needs a forward-port."""
    for version, release in real_releases.items():
        state, reason = release["verdicts"][patch.name]
        if Version(version) >= applied_upstream(patch):
            assert state == "fixed", (version, reason)
        else:
            assert state == "applies" or (state == "conflicts" and reason.endswith("forward-port it")), (
                version, reason)  # fmt: skip
    index = [r["wheel"] for v, r in real_releases.items() if v != PINS.pin]
    assert index and all("sha256 checked against the index" in w for w in index)


@pytest.mark.network
def test_overlay_no_longer_needed_once_every_fix_is_released(real_releases):
    last = max(map(applied_upstream, PATCHES))
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
    assert list(releases) == [PINS.pin, max(real_releases, key=Version)]


def test_patch_that_no_longer_applies_needs_a_forward_port(tmp_path):
    """A context line of the patch's first hunk differs from the release: that hunk is named."""
    repo = copy_repo(tmp_path / "repo")
    patch = repo / "patches" / ALONE.name
    hunk = re.search(r"^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@.*)\n((?:[-+].*\n)*) (.*)$", patch.read_text(), re.M)
    header, context = hunk.group(1), hunk.group(3)
    text = patch.read_text()
    patch.write_text(text[: hunk.start(3)] + context + "  # not in the release" + text[hunk.end(3) :])
    result = run(repo, "upstream-status", "--arch", "x86_64", PINS.pin)
    assert result.returncode == 0, result.stderr
    release = parse_status(result.stdout)[PINS.pin]
    state, reason = release["verdicts"].pop(ALONE.name)
    assert state == "conflicts"
    assert f"hunk '{header}'" in reason
    assert reason.endswith("forward-port it" if detect.for_origin(patching.origin(text)) else "review by hand")
    assert {s for s, _ in release["verdicts"].values()} <= {"applies"}
    assert release["summary"] == f"the overlay needs a forward-port before it can patch {PINS.pin}"


@pytest.mark.parametrize("arg, message", [
    ("0.19.x", "'0.19.x' is not a version"),
    pytest.param("99.0.0", "no x86_64 wheel of vllm==99.0.0 on the index", marks=pytest.mark.network),
])  # fmt: skip
def test_status_rejects_bad_versions(arg, message):
    result = run(REPO, "upstream-status", "--arch", "x86_64", arg)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"upstream-status: error: {message}")
