"""scripts/patch-queue: the series as git commits on the pristine release, and
the refusals that keep patches/, series and overlay/ one consistent whole."""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from build_helpers import GIT_ENV, LOCK, cache_dir, copy_repo, run_build, run_script, upstream_path
from overlaytools import gitrepo, patching, sources
from series_helpers import FILES, PATCHES, TEST_PROVENANCE, files_of, provenance

NAMES = [p.name for p in PATCHES]
QWEN3_FILE = "vllm/model_executor/models/qwen3_moe.py"


def untouched_model_file() -> str:
    """The first model file of the release (by name) that no patch of the series touches."""
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], ["x86_64"])
    with zipfile.ZipFile(upstream_path(artifact)) as zf:
        models = sorted(
            n for n in zf.namelist() if re.fullmatch(r"vllm/model_executor/models/[a-z]\w*\.py", n)
        )
    return next(rel for rel in models if rel not in FILES)


UNTOUCHED_FILE = untouched_model_file()
FIRST_LINE = "# SPDX-License-Identifier: Apache-2.0\n"  # every model file's
ONE_WHEEL = ["--offline", "--flavour", "cpu", "--arch", sources.host_arch()]


def git(
    queue: Path, *args: str, input: str | None = None, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["git", *args], cwd=queue, env={**GIT_ENV, **env}, input=input, capture_output=True, text=True
    )
    assert not check or result.returncode == 0, result.stderr
    return result


def state(repo: Path) -> dict[str, bytes]:
    """Every file of patches/ and overlay/, by path."""
    return {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for top in ("patches", "overlay")
        for p in sorted((repo / top).rglob("*"))
        if p.is_file()
    }


@functools.cache
def pristine(rel: str) -> bytes:
    return sources.pinned_pristine(LOCK, [rel], cache_dir(), offline=True)[rel]


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def upstream_style_patch(changes: dict[str, tuple[str, str]]) -> str:
    """A patch as an upstream PR gives it: written against pristine 0.19.1, its
    index lines naming the release's blobs. changes: path -> (old, new) text."""
    diffs = []
    for rel, (old, new) in changes.items():
        before = pristine(rel)
        after = before.decode().replace(old, new, 1).encode()
        assert after != before
        hunks = difflib.unified_diff(
            before.decode().splitlines(keepends=True), after.decode().splitlines(keepends=True), n=3
        )
        diffs.append(
            f"diff --git a/{rel} b/{rel}\nindex {blob_id(before)[:7]}..{blob_id(after)[:7]} "
            f"100644\n--- a/{rel}\n+++ b/{rel}\n" + "".join(list(hunks)[2:])
        )
    return (
        "From 1111111111111111111111111111111111111111 Mon Sep 17 00:00:00 2001\n"
        "From: Upstream Contributor <contributor@invalid>\n"
        "Date: Tue, 1 Dec 2026 12:00:00 +0000\n"
        "Subject: [PATCH] [Bugfix][Model] MoE: name the order of the expert outputs\n\n"
        "Say where shared and routed expert outputs are summed.\n---\n" + "".join(diffs)
    )


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A copy of the repository with a freshly imported queue."""
    repo = copy_repo(tmp_path_factory.mktemp("imported") / "repo")
    result = run_script(repo, "patch-queue", "import", "--offline")
    assert result.returncode == 0, result.stderr
    return repo


@pytest.fixture
def repo(imported, tmp_path) -> Path:
    """A private copy of `imported`, queue included, for a test to change."""
    return Path(shutil.copytree(imported, tmp_path / "repo", symlinks=True))


def export(repo: Path) -> subprocess.CompletedProcess:
    return run_script(repo, "patch-queue", "export", "--offline")


def refused(result: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a refusal."""
    assert result.returncode == 1, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# ---- import and the round trip ---------------------------------------------------------------


def test_import_is_the_release_then_one_commit_per_patch(imported):
    queue = imported / ".patch-queue"
    assert git(queue, "log", "-1", "--format=%s", "upstream").stdout == f"vLLM {LOCK.pin}\n"
    # The upstream commit holds every vllm/**.py of the release, as the release's blobs.
    names = git(queue, "ls-tree", "-r", "--name-only", "upstream").stdout.split()
    assert len(names) > 1000 and all(n.startswith("vllm/") and n.endswith(".py") for n in names)
    blob = git(queue, "rev-parse", f"upstream:{UNTOUCHED_FILE}").stdout.strip()
    assert blob == blob_id(pristine(UNTOUCHED_FILE))
    log = git(queue, "log", "--reverse", "--format=%an <%ae>|%aD|%s", "upstream..HEAD").stdout
    messages = [gitrepo.read_message(p) for p in PATCHES]
    assert log.splitlines() == [
        f"{m.author} <{m.email}>|{m.date}|{m.text.partition(chr(10))[0]}" for m in messages
    ]
    for rel in patching.touched_files(patching.series(imported / "patches")):
        assert git(queue, "show", f"HEAD:{rel}").stdout.encode() == (imported / "overlay" / rel).read_bytes()


def test_round_trip_changes_nothing(repo, tmp_path):
    before = state(repo)
    result = export(repo)
    assert result.returncode == 0, result.stderr
    assert "patches/ and overlay/ were up to date" in result.stderr
    assert state(repo) == before
    # Imports are reproducible: the same patches give the same commits.
    again = run_script(repo, "patch-queue", "import", "--offline", "--dir", str(tmp_path / "q2"))
    assert again.returncode == 0, again.stderr
    head = [git(q, "rev-parse", "HEAD").stdout for q in (repo / ".patch-queue", tmp_path / "q2")]
    assert head[0] == head[1]


# ---- one more patch from upstream, with git am -3 -----------------------------------------------

THIRD = {
    # Context overlaps the lines patch 0002 changes: only a 3-way merge applies it.
    QWEN3_FILE: (
        "        final_hidden_states = (\n",
        "        final_hidden_states = (\n            # shared experts first\n",
    ),
    # A file no patch touched before.
    UNTOUCHED_FILE: (FIRST_LINE, FIRST_LINE + "# (shared, routed), as SharedFusedMoE returns them\n"),
}


@pytest.fixture(scope="module")
def three_patches(imported, tmp_path_factory) -> Path:
    """The repository after one more, upstream-style patch went through the queue."""
    repo = Path(shutil.copytree(imported, tmp_path_factory.mktemp("three") / "repo", symlinks=True))
    queue = repo / ".patch-queue"
    before = state(repo)
    patch = repo.parent / "upstream.patch"
    patch.write_text(upstream_style_patch(THIRD))

    assert git(queue, "apply", "--check", str(patch), check=False).returncode != 0
    # --keep-non-patch keeps the [Bugfix][Model] tags (plain am strips every [...]).
    git(queue, "am", "-3", "--keep-non-patch", str(patch))
    assert git(queue, "log", "-1", "--format=%s").stdout.startswith("[Bugfix][Model] MoE:")

    # Without provenance the commit is refused, by name, and nothing is written.
    error = refused(export(repo), "patch-queue")
    short = git(queue, "rev-parse", "--short", "HEAD").stdout.strip()
    assert f"commit {short} ([Bugfix][Model] MoE: name the order" in error
    assert "no 'Origin:' line" in error
    assert state(repo) == before

    message = git(queue, "log", "-1", "--format=%B").stdout.rstrip("\n") + "\n\n" + TEST_PROVENANCE
    git(queue, "commit", "--amend", "-q", "-F", "-", input=message)
    result = export(repo)
    assert result.returncode == 0, result.stderr
    assert "bump label in upstream.lock.json" in result.stderr
    return repo


def test_new_patch_exports_last_and_leaves_the_others_alone(imported, three_patches):
    *series, new = patching.series(three_patches / "patches")
    assert [p.name for p in series] == NAMES
    assert new.name.startswith(f"{len(NAMES) + 1:04d}-Bugfix-Model-MoE-name-the-order")
    for name in NAMES:
        assert (three_patches / "patches" / name).read_bytes() == (imported / "patches" / name).read_bytes()
    text = new.read_text()
    assert "From: Upstream Contributor <contributor@invalid>" in text and TEST_PROVENANCE in text
    assert files_of(new) == sorted([UNTOUCHED_FILE, QWEN3_FILE])
    overlay = three_patches / "overlay"
    assert "# shared experts first" in (overlay / QWEN3_FILE).read_text()
    assert "# (shared, routed)" in (overlay / UNTOUCHED_FILE).read_text()
    assert "self.experts.is_internal_router" in (overlay / QWEN3_FILE).read_text()


def test_added_patch_passes_the_guards_and_reaches_the_wheel(three_patches, tmp_path):
    assert run_build("--verify-only", *ONE_WHEEL, repo=three_patches).returncode == 0
    check = run_script(three_patches, "patch-queue", "check", "--offline")
    assert check.returncode == 0, check.stderr
    assert f"{len(NAMES) + 1} patches are in export form" in check.stderr
    build = run_build(*ONE_WHEEL, "--out-dir", str(tmp_path), repo=three_patches)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for rel in (UNTOUCHED_FILE, QWEN3_FILE):
            assert zf.read(rel) == (three_patches / "overlay" / rel).read_bytes()


def test_upstream_status_judges_a_patch_without_detector_by_git_alone(three_patches):
    result = run_script(three_patches, "upstream-status", "--arch", "x86_64", LOCK.pin)
    assert result.returncode == 0, result.stderr
    lines = [ln.split() for ln in result.stdout.splitlines() if ".patch " in ln]
    assert [ln[1] for ln in lines] == ["applies"] * (len(NAMES) + 1)
    assert "judged by `git apply --check` forward and reverse alone" in result.stdout.splitlines()[-2]


def test_hand_edited_patch_of_a_shared_file_fails_check_until_exported(three_patches, tmp_path):
    repo = Path(shutil.copytree(three_patches, tmp_path / "repo", symlinks=True))
    third = patching.series(repo / "patches")[-1]
    third.write_text(third.read_text().replace("# shared experts first", "# shared first"))
    error = refused(run_script(repo, "patch-queue", "check", "--offline"), "patch-queue")
    assert "overlay differs from pristine + patches" in error
    # The queue is the way to change a patch: import the edited series, export it.
    assert run_script(repo, "patch-queue", "import", "--offline", "--force").returncode == 0
    assert export(repo).returncode == 0
    assert "# shared first" in (repo / "overlay" / QWEN3_FILE).read_text()
    assert run_script(repo, "patch-queue", "check", "--offline").returncode == 0


def test_dropping_the_added_patch_removes_its_patch_and_overlay_file(imported, three_patches, tmp_path):
    repo = Path(shutil.copytree(three_patches, tmp_path / "repo", symlinks=True))
    git(repo / ".patch-queue", "reset", "-q", "--hard", "HEAD~1")
    result = export(repo)
    assert result.returncode == 0, result.stderr
    assert f"removed overlay/{UNTOUCHED_FILE}" in result.stderr
    assert state(repo) == state(imported)


# ---- rework with plain git ---------------------------------------------------------------------


def rework(repo: Path, todo: str, tmp_path: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """`git rebase -i upstream` with `todo` ({first} and {second} name the first two
    commits, {rest} picks the others) as the maintainer's edited list, then export.
    The state before and the export."""
    queue, before = repo / ".patch-queue", state(repo)
    first, second, *others = git(queue, "rev-list", "--reverse", "upstream..HEAD").stdout.split()
    todo_file = tmp_path / "todo"
    rest = "".join(f"pick {commit}\n" for commit in others)
    todo_file.write_text(todo.format(first=first, second=second, rest=rest))
    git(queue, "rebase", "-q", "-i", "upstream", GIT_SEQUENCE_EDITOR=f"cp {todo_file}", GIT_EDITOR="true")
    result = export(repo)
    assert result.returncode == 0, result.stderr
    overlays = [
        {k: v for k, v in files.items() if k.startswith("overlay/")} for files in (before, state(repo))
    ]
    assert overlays[0] == overlays[1]
    assert run_build("--verify-only", *ONE_WHEEL, repo=repo).returncode == 0
    return before, result


def test_reorder_exports_the_reordered_series(repo, tmp_path):
    before, _ = rework(repo, "pick {second}\npick {first}\n{rest}", tmp_path)
    after = state(repo)
    first, second, *rest = NAMES
    renamed = {second: first[:4] + second[4:], first: second[:4] + first[4:], **{n: n for n in rest}}
    assert patching.series_names((repo / "patches" / "series").read_text()) == [
        renamed[n] for n in (second, first, *rest)
    ]
    for old, new in renamed.items():  # -N patches carry no number: the bytes stay
        assert after[f"patches/{new}"] == before[f"patches/{old}"]
    assert f"patches/{first}" not in after and f"patches/{second}" not in after


def test_squash_exports_one_patch_with_both_messages(repo, tmp_path):
    _, result = rework(repo, "pick {first}\nsquash {second}\n{rest}", tmp_path)
    squashed, *rest = patching.series(repo / "patches")
    assert squashed.name == NAMES[0] and f"removed patches/{NAMES[1]}" in result.stderr
    assert len(rest) == len(NAMES) - 2
    text = squashed.read_text()
    assert all(provenance(p)["Origin"] in text for p in PATCHES[:2])
    assert set(files_of(squashed)) == {*files_of(PATCHES[0]), *files_of(PATCHES[1])}
    assert run_script(repo, "patch-queue", "check", "--offline").returncode == 0


# ---- refusals --------------------------------------------------------------------------------


def _dirty(queue: Path) -> str:
    path = queue / QWEN3_FILE
    path.write_text(path.read_text() + "# uncommitted\n")
    return "has uncommitted changes"


def _unrelated_history(queue: Path) -> str:
    root = git(queue, "commit-tree", "HEAD^{tree}", "-m", "not on upstream").stdout.strip()
    git(queue, "reset", "-q", "--hard", root)
    return "HEAD is not based on upstream"


def _deleted_file(queue: Path) -> str:
    git(queue, "rm", "-q", UNTOUCHED_FILE)
    git(queue, "commit", "-q", "-m", f"Remove a module\n\n{TEST_PROVENANCE}")
    return f"deletes {UNTOUCHED_FILE}: {patching.ONLY_CHANGE_OR_ADD}"


def _renamed_file(queue: Path) -> str:
    git(queue, "mv", UNTOUCHED_FILE, UNTOUCHED_FILE.replace(".py", "_renamed.py"))
    git(queue, "commit", "-q", "-m", f"Rename a module\n\n{TEST_PROVENANCE}")
    return f"deletes {UNTOUCHED_FILE}: {patching.ONLY_CHANGE_OR_ADD}"


def _detached_behind(queue: Path) -> str:
    git(queue, "checkout", "-q", "--detach", "HEAD~1")
    return "HEAD is detached at commit"


@pytest.mark.parametrize(
    "damage", [_dirty, _unrelated_history, _deleted_file, _renamed_file, _detached_behind]
)
def test_export_refuses(repo, damage):
    before = state(repo)
    expected = damage(repo / ".patch-queue")
    assert expected in refused(export(repo), "patch-queue")
    assert state(repo) == before


def test_export_of_a_detached_head_needs_the_flag(repo):
    """Exporting a detached HEAD behind the branch drops the later patches: only on request."""
    queue = repo / ".patch-queue"
    git(queue, "checkout", "-q", "--detach", "HEAD~1")
    error = refused(export(repo), "patch-queue")
    assert "1 commit(s) behind patches" in error and "--detached" in error
    result = run_script(repo, "patch-queue", "export", "--offline", "--detached")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in patching.series(repo / "patches")] == NAMES[:-1]


def test_import_refuses_to_overwrite_a_queue(repo):
    queue = repo / ".patch-queue"
    head = git(queue, "rev-parse", "HEAD").stdout
    error = refused(run_script(repo, "patch-queue", "import", "--offline"), "patch-queue")
    assert "exists and is not empty; pass --force" in error
    assert git(queue, "rev-parse", "HEAD").stdout == head


STRAY = "overlay/" + UNTOUCHED_FILE


@pytest.mark.parametrize(
    "command",
    [
        ["build.sh", *ONE_WHEEL],
        ["build.sh", "--verify-only", *ONE_WHEEL],
        ["patch-queue", "check", "--offline"],
    ],
    ids=["build", "verify-only", "check"],
)
def test_overlay_file_no_patch_touches_is_refused(command, tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / STRAY).write_bytes(pristine(UNTOUCHED_FILE) + b"# changed by no patch\n")
    before = state(repo)
    if command[0] == "build.sh":
        result = run_build(*command[1:], "--out-dir", str(tmp_path / "out"), repo=repo)
    else:
        result = run_script(repo, *command)
    error = refused(result, command[0])
    assert f"{STRAY}: no patch in patches/series changes it" in error
    assert "scripts/patch-queue" in error and "or delete it" in error
    assert state(repo) == before
    out = tmp_path / "out"
    assert not out.exists() or not list(out.glob("*.whl"))
