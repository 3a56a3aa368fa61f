"""Faults and bad input: kills at each stage of a build, a full disk, a damaged lock,
series or plugin manifest. Each test's docstring names the README promise it checks.

Builds run --offline against the shared cache, mostly --flavour plugin (the
promises about publishing do not depend on the flavour). A build stops itself
at a named stage with VLLM_OVERLAY_STOP_AT (SIGSTOP), so the test signals it
exactly there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from build_helpers import LOCK, REPO, cache_dir, copy_repo, run_build, run_script
from plugin_helpers import PLUGIN_WHEEL as PLUGIN_WHEEL_PATH
from plugin_helpers import installed_plugin, plugin_site, pristine_vllm
from serve_helpers import VENV

PLUGIN_ONLY = ["--flavour", "plugin", "--arch", "x86_64", "--offline"]
VERIFY_CPU = ["--verify-only", "--offline", "--flavour", "cpu", "--arch", "aarch64"]
PLUGIN_WHEEL = f"vllm_moe_overlay-{LOCK.pin}+{LOCK.label}-py3-none-any.whl"
OLD_WHEEL = "older-0.1-py3-none-any.whl"
QWEN3 = "vllm/model_executor/models/qwen3_moe.py"


def one_error(result, prog: str = "build.sh") -> str:
    """The tool's one error line: exit 1, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def old_set(out: Path) -> dict[str, str]:
    """A previously published output directory: one wheel and its SHA256SUMS."""
    out.mkdir(parents=True)
    (out / OLD_WHEEL).write_bytes(b"an older wheel")
    digest = hashlib.sha256(b"an older wheel").hexdigest()
    (out / "SHA256SUMS").write_text(f"{digest}  {OLD_WHEEL}\n")
    return {OLD_WHEEL: digest}


def published(out: Path) -> dict[str, str]:
    """The wheels in `out` with their sha256, after checking SHA256SUMS lists exactly
    them with those hashes (computed here with hashlib)."""
    wheels = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.whl")}
    listed = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert listed == wheels
    assert sorted(p.name for p in out.iterdir()) == sorted([*wheels, "SHA256SUMS"])
    return wheels


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.staging-*"))


def stopped_build(out: Path, stage: str, *args: str) -> subprocess.Popen:
    """A build that stopped itself at `stage`."""
    proc = subprocess.Popen(
        [str(REPO / "build.sh"), *(args or PLUGIN_ONLY), "--out-dir", str(out)],
        env={**os.environ, "VLLM_OVERLAY_STOP_AT": stage},
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the build ended before {stage}: {proc.stderr.read()}"
    return proc


# ---- kills at each stage -------------------------------------------------------------

STAGES = {"before-staging": "old", "staging": "old", "staged": "old", "published": "new"}


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_each_stage_leaves_the_old_or_the_new_set(tmp_path, stage):
    """Promise: after a kill at any instant dist/ holds the old set or the new one, and
    agrees with its SHA256SUMS; the next build removes and reports a killed build's
    staging directory."""
    out = tmp_path / "out"
    old = old_set(out)
    proc = stopped_build(out, stage)
    proc.kill()
    proc.wait(timeout=30)
    now = published(out)
    if STAGES[stage] == "old":
        assert now == old
    else:
        assert set(now) == {OLD_WHEEL, PLUGIN_WHEEL} and now[OLD_WHEEL] == old[OLD_WHEEL]
    left = staging_dirs(out)
    assert len(left) == (0 if stage == "before-staging" else 1)

    again = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert again.returncode == 0, again.stderr
    for path in left:
        assert f"removed {path} (" in again.stderr and "left by an interrupted build" in again.stderr
    assert staging_dirs(out) == []
    assert set(published(out)) == {OLD_WHEEL, PLUGIN_WHEEL}


def add_published(out: Path, name: str, data: bytes) -> None:
    """A wheel in `out` as an earlier build published it: listed in SHA256SUMS."""
    (out / name).write_bytes(data)
    with open(out / "SHA256SUMS", "a") as sums:
        sums.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def test_wheels_of_an_earlier_label_leave_with_the_next_build(tmp_path):
    """dist/ holds one label's set: after a label bump the next build drops this overlay's
    wheels of the earlier label that a build published there (and says so), and keeps other
    files and wheels."""
    out = tmp_path / "dist"
    old_set(out)
    earlier = PLUGIN_WHEEL.replace(f"+{LOCK.label}-", "+moefix.0-")
    add_published(out, earlier, b"an earlier label's plugin")
    result = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert f"dropped 1 wheel(s) of another label from {out}: {earlier}" in result.stderr
    assert set(published(out)) == {OLD_WHEEL, PLUGIN_WHEEL}


def test_publishing_keeps_every_wheel_it_did_not_publish(tmp_path):
    """Promise: a build removes only wheels this overlay published under an earlier label
    (named as the lock's wheels are, listed in the SHA256SUMS a build wrote, unchanged since):
    upstream's own wheels, this overlay's wheels of another release, and an earlier label's
    wheel that no build published (or that changed since) stay."""
    out = tmp_path / "dist"
    old_set(out)
    (cuda,) = LOCK.wheels(LOCK.pin, ["cuda"], ["x86_64"])
    earlier = PLUGIN_WHEEL.replace(f"+{LOCK.label}-", "+moefix.0-")
    kept = {
        cuda.filename: b"upstream's wheel",  # vllm-0.19.1-cp38-abi3-...
        f"vllm_moe_overlay-0.20.0+{LOCK.label}-py3-none-any.whl": b"another release's plugin",
        f"vllm-{LOCK.pin}+mybuild.1-py3-none-any.whl": b"a local build of vllm",
        earlier: b"copied in by hand, never published",
    }
    for name, data in kept.items():
        (out / name).write_bytes(data)
    changed = PLUGIN_WHEEL.replace(f"+{LOCK.label}-", "+moefix.1-")
    add_published(out, changed, b"published")
    (out / changed).write_bytes(b"changed since")
    kept[changed] = b"changed since"
    result = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "dropped" not in result.stderr
    now = published(out)
    assert set(now) == {OLD_WHEEL, PLUGIN_WHEEL, *kept}
    for name, data in kept.items():
        assert (out / name).read_bytes() == data


@pytest.mark.parametrize("where", ["the cache", "its artifacts"])
def test_out_dir_inside_the_cache_is_refused(tmp_path, where):
    """Promise: an --out-dir that is the cache, or inside it, is refused like the cache
    itself: one line, and every cached file stays."""
    cache = linked_cache(tmp_path)
    out = cache if where == "the cache" else cache / "artifacts"
    before = {p: p.read_bytes() for p in (cache / "artifacts").iterdir()}
    flags = ["--offline", "--flavour", "cpu", "--arch", "aarch64"]
    line = one_error(run_build(*flags, "--cache-dir", str(cache), "--out-dir", str(out)))
    assert f"--out-dir {out} is inside the artifact cache" in line
    assert {p: p.read_bytes() for p in (cache / "artifacts").iterdir()} == before
    assert sorted(p.name for p in cache.iterdir()) == ["artifacts"]


def test_sigterm_after_publishing_still_says_what_was_written(tmp_path):
    """Promise: SIGINT/SIGTERM end with exit 130 and one line saying whether the new set was
    published, also when the signal comes once the build is done (while Python shuts down)."""
    out = tmp_path / "out"
    old_set(out)
    proc = stopped_build(out, "finished")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("build.sh: error: ")]
    assert lines == [
        f"build.sh: error: interrupted; 1 wheel(s) and SHA256SUMS were published into {out}; "
        "the build had finished"
    ], stderr
    assert set(published(out)) == {OLD_WHEEL, PLUGIN_WHEEL}


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(n) for n in path.read_text().split()]
    except OSError:
        return []


def test_killed_build_takes_its_children_and_the_next_cleans_tmpdir(tmp_path):
    """Promise: nothing of a SIGKILLed build lives on: the plugin's setuptools child dies
    with it, and the next build removes, and names, the directory it left in TMPDIR."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(REPO / "build.sh"), *PLUGIN_ONLY, "--out-dir", str(out)],
        env={**os.environ, "TMPDIR": str(tmpdir)},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    setuptools = None
    while setuptools is None:
        assert proc.poll() is None and time.monotonic() < deadline, "setuptools never ran"
        for child in children(proc.pid):
            try:
                if b"build_meta" in Path(f"/proc/{child}/cmdline").read_bytes():
                    setuptools = child
            except OSError:
                pass
        time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (
        Path(f"/proc/{setuptools}").exists()
        and b"build_meta" in Path(f"/proc/{setuptools}/cmdline").read_bytes()
    ):
        assert time.monotonic() < deadline, f"setuptools (pid {setuptools}) outlived the killed build"
        time.sleep(0.05)
    (left,) = tmpdir.glob("vllm-moe-overlay-plugin-*")
    assert list(left.glob("wheels/*.whl")) == [], "setuptools went on after the build was killed"
    again = run_build(*PLUGIN_ONLY, "--out-dir", str(out), env={"TMPDIR": str(tmpdir)})
    assert again.returncode == 0, again.stderr
    assert f"removed {left} (" in again.stderr and "left by an interrupted build" in again.stderr
    assert list(tmpdir.glob("vllm-moe-overlay-plugin-*")) == []


@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_at_each_stage_says_what_was_written(tmp_path, stage):
    """Promise: an interruption exits non-zero with one line naming what was and was not
    written, leaves dist/ consistent with its SHA256SUMS, and leaves no staging dir."""
    out = tmp_path / "out"
    old = old_set(out)
    proc = stopped_build(out, stage)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    now = published(out)
    if STAGES[stage] == "old":
        assert f"build.sh: error: interrupted; no wheel was written; {out} is unchanged" in stderr
        assert now == old
    else:
        assert f"build.sh: error: interrupted; 1 wheel(s) and SHA256SUMS were published into {out}" in stderr
        assert set(now) == {OLD_WHEEL, PLUGIN_WHEEL}
    assert staging_dirs(out) == []


def test_sigkill_while_a_wheel_is_written(tmp_path):
    """Promise: a kill while a wheel is half-written leaves dist/ as it was; the next
    build removes the half-written staging directory and says so."""
    out = tmp_path / "out"
    old = old_set(out)
    proc = subprocess.Popen(
        [str(REPO / "build.sh"), "--offline", "--flavour", "cpu", "--arch", "aarch64", "--out-dir", str(out)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not [p for d in staging_dirs(out) for p in d.glob("*.whl") if p.stat().st_size > 0]:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=30)
    assert published(out) == old
    (left,) = staging_dirs(out)
    again = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert again.returncode == 0 and f"removed {left} (" in again.stderr, again.stderr
    assert staging_dirs(out) == []


def test_a_running_builds_staging_dir_is_left_alone(tmp_path):
    """Promise: concurrent builds may share one output directory: cleaning up after
    killed builds never touches the staging directory of a running one."""
    out = tmp_path / "out"
    old_set(out)
    first = stopped_build(out, "staging")
    (running,) = staging_dirs(out)
    second = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert second.returncode == 0 and "removed" not in second.stderr, second.stderr
    assert running.is_dir()
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert set(published(out)) == {OLD_WHEEL, PLUGIN_WHEEL}
    assert staging_dirs(out) == []


# ---- a full disk -----------------------------------------------------------------------


@contextmanager
def small_tmpfs(path: Path):
    """A 1 MiB tmpfs at `path`; skips where mounting is not allowed."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); a "
            "file-size limit would not stand in for a full disk under git and pip"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(disk: Path, free: int) -> None:
    """Leave `free` bytes on `disk`."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as filler:
        filler.write(b"\0" * (stat.f_bavail * stat.f_frsize - free))


PAGE = 4096


@pytest.mark.parametrize("stage", ["wheel", "SHA256SUMS"])
def test_disk_full_in_the_output_directory(tmp_path, stage):
    """Promise: a disk that fills while the build writes its wheel or SHA256SUMS ends in
    one line naming the cause, and dist/ keeps the old set."""
    # Room for the whole plugin wheel (dist/'s, from the same inputs) but not for
    # SHA256SUMS, or for less than the wheel.
    pages = -(-PLUGIN_WHEEL_PATH.stat().st_size // PAGE)
    with small_tmpfs(tmp_path / "disk") as disk:
        out = disk / "out"
        old = old_set(out)
        fill(disk, pages * PAGE if stage == "SHA256SUMS" else PAGE)
        result = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
        line = one_error(result)
        assert "No space left on device" in line and f"{out} is unchanged" in line
        assert published(out) == old
        assert staging_dirs(out) == []


def test_disk_full_in_tmpdir(tmp_path):
    """Promise: a full TMPDIR ends in one line naming the cause; dist/ keeps the old set."""
    out = tmp_path / "out"
    old = old_set(out)
    with small_tmpfs(tmp_path / "disk") as disk:
        fill(disk, PAGE)  # Python's tempfile skips a TMPDIR it cannot write at all
        result = run_build(*PLUGIN_ONLY, "--out-dir", str(out), env={"TMPDIR": str(disk)})
        assert "No space left on device" in one_error(result)
    assert published(out) == old


# ---- bad output and cache directories ----------------------------------------------------


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_out_dir_that_cannot_be_a_directory(tmp_path, case):
    """Promise: bad input gets one line naming the cause."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if case == "a file" else tmp_path / "file" / "out"
    result = run_build(*PLUGIN_ONLY, "--out-dir", str(out))
    assert str(out) in one_error(result)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("case", ["cache dir is a file", "artifacts is a file", "wheel is a dir"])
def test_cache_that_is_not_usable(tmp_path, case):
    """Promise: bad input gets one line naming the cause; nothing of it is deleted."""
    cache = tmp_path / "cache"
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], ["aarch64"])
    bad = {
        "cache dir is a file": cache,
        "artifacts is a file": cache / "artifacts",
        "wheel is a dir": cache / "artifacts" / artifact.filename,
    }[case]
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.mkdir() if case == "wheel is a dir" else bad.write_text("x")
    result = run_build(*VERIFY_CPU, "--cache-dir", str(cache))
    assert str(bad) in one_error(result)
    assert bad.is_dir() if case == "wheel is a dir" else bad.read_text() == "x"


def patch_adding_a_symlink(repo: Path) -> None:
    text = MESSAGE + git_section(
        f"diff --git a/{NEW_MODEL} b/{NEW_MODEL}\nnew file mode 120000\n--- /dev/null\n+++ b/{NEW_MODEL}",
        "@@ -0,0 +1 @@\n+../../../../../etc/passwd\n\\ No newline at end of file",
    )
    (repo / "patches" / "0009-link.patch").write_text(text)
    series = repo / "patches" / "series"
    series.write_text(series.read_text() + "0009-link.patch\n")


def overlay_symlink(repo: Path) -> None:
    target = repo / "overlay" / QWEN3
    target.rename(repo / "qwen3_moe.py")
    target.symlink_to(repo / "qwen3_moe.py")


def cache_kind(case: str):
    def damage(repo: Path, cache: Path) -> None:
        (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], ["aarch64"])
        bad = {
            "cache is a file": cache,
            "artifacts is a file": cache / "artifacts",
            "cached wheel is a dir": cache / "artifacts" / artifact.filename,
        }[case]
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.mkdir() if case == "cached wheel is a dir" else bad.write_text("x")

    return damage


def with_cache(damage):
    """A damaged checkout with a usable cache, so only the damage can refuse the build."""

    def both(repo: Path, cache: Path) -> None:
        linked_cache(cache.parent)
        damage(repo)

    return both


REFUSALS = {
    "symlink in overlay/": (with_cache(overlay_symlink), "is a symlink"),
    "patch adds a symlink": (with_cache(patch_adding_a_symlink), "gives mode 120000"),
    "cache is a file": (cache_kind("cache is a file"), "is not a directory"),
    "artifacts is a file": (cache_kind("artifacts is a file"), "is not a directory"),
    "cached wheel is a dir": (cache_kind("cached wheel is a dir"), "in the cache is not a file"),
    "--offline, no cache": (lambda repo, cache: None, "is not in the cache"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_write_nothing(tmp_path, case):
    """Promise: bad input exits 1 with one line naming the cause, before any file is
    written: no lock beside --out-dir, no staging directory, no cache directory made."""
    repo = copy_repo(tmp_path / "repo")
    cache = tmp_path / "cache"
    damage, expected = REFUSALS[case]
    damage(repo, cache)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    flags = ["--offline", "--flavour", "cpu", "--arch", "aarch64"]
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    result = run_build(*flags, "--cache-dir", str(cache), "--out-dir", str(out), repo=repo, env=env)
    assert expected in one_error(result)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


# ---- the lock --------------------------------------------------------------------------


def edited_lock(tmp_path: Path, edit) -> Path:
    raw = json.loads((REPO / "upstream.lock.json").read_text())
    edit(raw)
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(raw))
    return path


def cpu_arm_entry(raw: dict) -> dict:
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], ["aarch64"])
    return next(e for e in raw["releases"][LOCK.pin] if e["filename"] == artifact.filename)


def linked_cache(tmp_path: Path) -> Path:
    """A private cache holding the verified cpu aarch64 wheel (a hard link where possible)."""
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], ["aarch64"])
    store = tmp_path / "cache" / "artifacts"
    store.mkdir(parents=True)
    try:
        os.link(cache_dir() / "artifacts" / artifact.filename, store / artifact.filename)
    except OSError:
        shutil.copy(cache_dir() / "artifacts" / artifact.filename, store / artifact.filename)
    return tmp_path / "cache"


LOCK_CASES = {
    "releases a list": (lambda raw: raw.update(releases=[]), "releases must be a JSON object"),
    "label an int": (lambda raw: raw.update(label=1), "label must be a JSON string"),
    "sha256 null": (lambda raw: cpu_arm_entry(raw).update(sha256=None), ".sha256 must be a JSON string"),
    "sha256 short": (lambda raw: cpu_arm_entry(raw).update(sha256="ab" * 8), "is not 64 hex digits"),
    "filename with ../": (
        lambda raw: cpu_arm_entry(raw).update(filename="../outside.whl"),
        "is not a plain file name",
    ),
    "size a string": (lambda raw: cpu_arm_entry(raw).update(size="1"), ".size must be a JSON integer"),
    "missing key": (lambda raw: cpu_arm_entry(raw).pop("project"), "lacks project"),
}


@pytest.mark.parametrize("case", LOCK_CASES)
def test_bad_lock_is_refused_before_any_file_is_touched(tmp_path, case):
    """Promise: the lock is validated before any file is touched: one line naming the
    cause, and the cache keeps every file."""
    edit, expected = LOCK_CASES[case]
    cache = linked_cache(tmp_path)
    (tmp_path / "outside.whl").write_text("not the cache's")
    before = sorted(p.name for p in (cache / "artifacts").iterdir())
    result = run_build(*VERIFY_CPU, "--cache-dir", str(cache), "--lock", str(edited_lock(tmp_path, edit)))
    assert expected in one_error(result)
    assert sorted(p.name for p in (cache / "artifacts").iterdir()) == before
    assert (tmp_path / "outside.whl").read_text() == "not the cache's"


def test_lock_size_is_checked(tmp_path):
    """Promise: every field of the lock is checked: a size that is not the size of the file
    with the locked sha256 is refused in one line, and the cached file is kept."""
    cache = linked_cache(tmp_path)
    (cached,) = (cache / "artifacts").glob("*.whl")
    size = cached.stat().st_size
    lock = edited_lock(tmp_path, lambda raw: cpu_arm_entry(raw).update(size=size + 1))
    line = one_error(run_build(*VERIFY_CPU, "--cache-dir", str(cache), "--lock", str(lock)))
    assert f"it has {size} bytes and the lock says {size + 1}" in line
    assert cached.stat().st_size == size


def test_upper_case_sha256_is_the_same_hash(tmp_path):
    """Promise: sha256 compares equal in any case; the good cached wheel is used and kept."""
    cache = linked_cache(tmp_path)
    lock = edited_lock(
        tmp_path, lambda raw: cpu_arm_entry(raw).update(sha256=cpu_arm_entry(raw)["sha256"].upper())
    )
    result = run_build(*VERIFY_CPU, "--cache-dir", str(cache), "--lock", str(lock))
    assert result.returncode == 0, result.stderr
    assert len(list((cache / "artifacts").glob("*.whl"))) == 1


def test_wrong_sha256_in_the_lock_keeps_the_cached_file(tmp_path):
    """Promise: the cache is never poisoned, and a failed verification discards only a
    file the build downloaded itself: a wrong lock leaves the good cached wheel."""
    cache = linked_cache(tmp_path)
    (cached,) = (cache / "artifacts").glob("*.whl")
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    lock = edited_lock(tmp_path, lambda raw: cpu_arm_entry(raw).update(sha256="0" * 64))
    line = one_error(run_build(*VERIFY_CPU, "--cache-dir", str(cache), "--lock", str(lock)))
    assert f"sha256 {digest} does not match" in line and "kept" in line
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


# ---- the series and the overlay ----------------------------------------------------------


def qwen3_patch(repo: Path) -> Path:
    (patch,) = (repo / "patches").glob("0002-*.patch")
    return patch


def first_lines(path: str, count: int) -> list[str]:
    return (REPO / "overlay" / path).read_text().splitlines()[:count]


def git_section(header: str, body: str) -> str:
    return f"---\n\n{header}\n{body}\n-- \n2.43.0\n"


MESSAGE = (
    "From 0 Mon Sep 17 00:00:00 2001\nFrom: a <a@b.c>\nDate: Sun, 22 Nov 2026 00:00:00 +0000\n"
    "Subject: [PATCH] x\n\nOrigin: test\n"
)
NEW_MODEL = "vllm/model_executor/models/new_model.py"
SERIES_CASES = {
    "empty series": (None, "lists no patch"),
    "plain diff": (
        f"{MESSAGE}---\n--- /dev/null\n+++ b/{NEW_MODEL}\n@@ -0,0 +1 @@\n+x = 1\n",
        "has no 'diff --git' header; the patch is not in git's format",
    ),
    "absolute path": (
        MESSAGE
        + git_section(
            f"diff --git a/{NEW_MODEL} b/{NEW_MODEL}\nnew file mode 100644\n--- /dev/null\n+++ /tmp/x.py",
            "@@ -0,0 +1 @@\n+x = 1",
        ),
        f"does not name b/{NEW_MODEL}",
    ),
    "outside vllm/": (
        MESSAGE
        + git_section(
            "diff --git a/setup.py b/setup.py\nnew file mode 100644\n--- /dev/null\n+++ b/setup.py",
            "@@ -0,0 +1 @@\n+x = 1",
        ),
        "setup.py is not a file under vllm/",
    ),
    "_version.py": (
        MESSAGE
        + git_section(
            "diff --git a/vllm/_version.py b/vllm/_version.py\n"
            "--- a/vllm/_version.py\n+++ b/vllm/_version.py",
            "@@ -1 +1 @@\n-a\n+b",
        ),
        "vllm/_version.py is written by the build",
    ),
    "deletes a target": (
        MESSAGE
        + git_section(
            f"diff --git a/{QWEN3} b/{QWEN3}\ndeleted file mode 100644\n--- a/{QWEN3}\n+++ /dev/null",
            f"@@ -1 +0,0 @@\n-{first_lines(QWEN3, 1)[0]}",
        ),
        f"deletes {QWEN3}",
    ),
    "renames a target": (
        MESSAGE
        + git_section(
            f"diff --git a/{QWEN3} b/{NEW_MODEL}\nsimilarity index 100%\n"
            f"rename from {QWEN3}\nrename to {NEW_MODEL}",
            "",
        ),
        f"renames {QWEN3} to {NEW_MODEL}",
    ),
    "changes nothing": (
        MESSAGE
        + git_section(
            f"diff --git a/{QWEN3} b/{QWEN3}\n--- a/{QWEN3}\n+++ b/{QWEN3}",
            "@@ -1,3 +1,3 @@\n {0}\n-{1}\n+{1}\n {2}".format(*first_lines(QWEN3, 3)),
        ),
        "changes no file of the wheel",
    ),
}


@pytest.mark.parametrize("case", [*SERIES_CASES, "not UTF-8"])
def test_bad_series_is_refused_in_one_line(tmp_path, case):
    """Promise: the build refuses an empty series, a patch not in git's format, one whose
    paths leave vllm/, one that deletes or renames a target or changes no file of the
    wheel, and non-UTF-8 patches, each in one line naming the cause."""
    repo = copy_repo(tmp_path / "repo")
    series = repo / "patches" / "series"
    if case == "not UTF-8":
        patch = qwen3_patch(repo)
        patch.write_bytes(patch.read_bytes().replace(b"Origin:", b"\xff Origin:"))
        expected = f"{patch.name} is not UTF-8 text (byte 0xff"
    elif SERIES_CASES[case][0] is None:
        series.write_text("")
        expected = SERIES_CASES[case][1]
    else:
        text, expected = SERIES_CASES[case]
        (repo / "patches" / "0003-bad.patch").write_text(text)
        series.write_text(series.read_text() + "0003-bad.patch\n")
    out = tmp_path / "out"
    result = run_build("--offline", "--flavour", "cpu", "--arch", "aarch64", "--out-dir", str(out), repo=repo)
    assert expected in one_error(result)
    assert not out.exists()


def test_symlinked_overlay_dir_is_refused(tmp_path):
    """Promise: symlinked overlay dirs are refused (the tools never read or write
    outside the checkout through one)."""
    repo = copy_repo(tmp_path / "repo")
    outside = tmp_path / "outside"
    shutil.move(repo / "overlay" / "vllm", outside)
    (repo / "overlay" / "vllm").symlink_to(outside)
    result = run_build(*VERIFY_CPU, repo=repo)
    assert f"{repo / 'overlay' / 'vllm'} is a symlink" in one_error(result)


def test_symlinked_patch_is_refused(tmp_path):
    """Promise: the tools never read outside the checkout through a symlink: a patch in
    patches/ that is a link is refused, not followed."""
    repo = copy_repo(tmp_path / "repo")
    patch = qwen3_patch(repo)
    outside = tmp_path / patch.name
    patch.rename(outside)
    patch.symlink_to(outside)
    result = run_build(*VERIFY_CPU, repo=repo)
    assert f"{patch} is a symlink" in one_error(result)


def test_upstream_status_with_an_empty_series(tmp_path):
    """Promise: every tool ends bad input in one line naming the cause."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "patches" / "series").write_text("")
    assert "lists no patch" in one_error(run_script(repo, "upstream-status"), "upstream-status")


def test_queue_import_force_removes_only_a_queue(tmp_path):
    """Promise: `patch-queue import --force` removes only a directory it recognizes as a
    queue it made."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = run_script(REPO, "patch-queue", "import", "--dir", str(precious), "--force", "--offline")
    assert "is not a patch queue made by patch-queue import" in one_error(result, "patch-queue")
    assert (precious / "notes.txt").read_text() == "keep me"


# ---- the plugin in real vLLM processes -------------------------------------------------

MANIFEST_CASES = {
    "truncated": lambda text: text[: len(text) // 2],
    "missing key": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "label"}),
    "wrong type": lambda text: json.dumps({**json.loads(text), "modules": "vllm"}),
    "empty module list": lambda text: json.dumps({**json.loads(text), "modules": []}),
    "bad sha256": lambda text: text.replace('"pristine_sha256": "', '"pristine_sha256": "X', 1),
    # what a later builder might write, or an earlier one that carried no version
    "other schema version": lambda text: json.dumps(
        {**json.loads(text), "schema": json.loads(text)["schema"] + 1}
    ),
    "no schema version": lambda text: json.dumps(
        {k: v for k, v in json.loads(text).items() if k != "schema"}
    ),
}
LOAD = """
import importlib.util
from vllm.plugins import load_general_plugins
load_general_plugins()
print("ORIGIN", importlib.util.find_spec("vllm.model_executor.models.qwen3_moe").origin)
"""


HOOK_LINE = "vllm-moe-overlay: startup hook: nothing served: "
HOOK = [True, False]  # the plugin's folder read as a site directory (its .pth runs), or not
HOOK_IDS = ["startup-hook", "entry-point-only"]


def plugin_path(plugin: Path, hook: bool) -> str:
    return f"{pristine_vllm()}{os.pathsep}{plugin_site(plugin) if hook else plugin}"


def assert_hook_said_once(stderr: str, hook: bool, cause: str) -> None:
    """With the startup hook, its one stderr line naming the cause; without, none."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith(HOOK_LINE)]
    assert len(lines) == (1 if hook else 0) and all(cause in ln for ln in lines), stderr


@pytest.mark.parametrize("hook", HOOK, ids=HOOK_IDS)
@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_corrupted_manifest_never_takes_vllm_down(tmp_path, case, hook):
    """Promise: the plugin can never take vLLM down: a manifest it cannot validate is
    refused with one ERROR naming the cause (and the startup hook's one stderr line),
    nothing is applied, and the check command says NOT fixed (exit 1) without a
    traceback."""
    plugin = tmp_path / "plugin"
    shutil.copytree(installed_plugin(), plugin)
    manifest = plugin / "vllm_moe_overlay" / "manifest.json"
    manifest.write_text(MANIFEST_CASES[case](manifest.read_text()))
    env = {
        **os.environ,
        "PYTHONPATH": plugin_path(plugin, hook),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    loaded = subprocess.run([str(VENV / "bin/python"), "-c", LOAD], env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    output = loaded.stdout + loaded.stderr
    errors = [ln for ln in output.splitlines() if "vllm-moe-overlay: not applied" in ln]
    assert len(errors) == 1 and "ERROR" in errors[0] and str(manifest) in errors[0], output
    assert_hook_said_once(loaded.stderr, hook, str(manifest))
    assert "Traceback" not in output
    origin = next(ln for ln in loaded.stdout.splitlines() if ln.startswith("ORIGIN "))
    assert origin == f"ORIGIN {pristine_vllm() / QWEN3}"

    check = subprocess.run(
        [str(VENV / "bin/python"), "-m", "vllm_moe_overlay"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 1 and "Traceback" not in check.stdout + check.stderr
    assert check.stdout.splitlines()[-1] == "result: NOT fixed"


@pytest.mark.parametrize("hook", HOOK, ids=HOOK_IDS)
def test_altered_plugin_file_is_refused(tmp_path, hook):
    """Promise: the plugin serves only the files its manifest records: a packaged file
    changed after the build is refused with one ERROR naming it, nothing applied."""
    plugin = tmp_path / "plugin"
    shutil.copytree(installed_plugin(), plugin)
    altered = plugin / "vllm_moe_overlay" / "files" / QWEN3
    altered.write_bytes(altered.read_bytes() + b"\n# altered\n")
    env = {
        **os.environ,
        "PYTHONPATH": plugin_path(plugin, hook),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    loaded = subprocess.run([str(VENV / "bin/python"), "-c", LOAD], env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    output = loaded.stdout + loaded.stderr
    errors = [ln for ln in output.splitlines() if "vllm-moe-overlay: not applied" in ln]
    assert len(errors) == 1 and "ERROR" in errors[0] and str(altered) in errors[0], output
    assert_hook_said_once(loaded.stderr, hook, str(altered))
    origin = next(ln for ln in loaded.stdout.splitlines() if ln.startswith("ORIGIN "))
    assert origin == f"ORIGIN {pristine_vllm() / QWEN3}"


def test_check_command_without_vllm(tmp_path):
    """Promise: `python -m vllm_moe_overlay` exits non-zero, without a traceback, when
    vLLM does not get the fixed modules, here because no vLLM is installed."""
    env = {**os.environ, "PYTHONPATH": str(installed_plugin())}
    # -S: without the site-packages of the test environment, so no vLLM at all
    check = subprocess.run(
        [str(VENV / "bin/python"), "-S", "-m", "vllm_moe_overlay"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 1 and "Traceback" not in check.stdout + check.stderr
    assert "vLLM: NOT installed" in check.stdout
    assert check.stdout.splitlines()[-1] == "result: NOT fixed"
