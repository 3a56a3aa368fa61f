"""Shared by the build tests: the repo's paths, build.sh runs, raw zip member access."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

from overlaytools import fetch, lock, rewheel

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "dist"
LOCK = lock.load()
PINS = LOCK  # the name tests/gpu imports (its rename is left to the GPU lane's owner)


# git with no user or system configuration and a fixed identity, as a maintainer's queue has.
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "A Maintainer",
    "GIT_AUTHOR_EMAIL": "maintainer@invalid",
    "GIT_COMMITTER_NAME": "A Maintainer",
    "GIT_COMMITTER_EMAIL": "maintainer@invalid",
}


def cache_dir() -> Path:
    return fetch.default_cache_dir()


def upstream_path(artifact: lock.Artifact) -> Path:
    """The cached upstream artifact, verified by sha256 before it is handed out."""
    with fetch.open_verified(artifact, LOCK.pin, cache_dir(), offline=True):
        pass
    return cache_dir() / "artifacts" / artifact.filename


def built_wheel(artifact: lock.Artifact) -> Path:
    return DIST / rewheel.patched_filename(LOCK, artifact, LOCK.pin)


def run_build(*args: str, repo: Path = REPO, env: dict | None = None, **kwargs):
    """build.sh from `repo` with extra arguments; output captured as text."""
    return subprocess.run(
        [str(repo / "build.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def run_script(repo: Path, script: str, *args: str, timeout: float = 600):
    """scripts/<script> from `repo` with arguments; output captured as text."""
    return subprocess.run(
        [str(repo / "scripts" / script), *args], capture_output=True, text=True, timeout=timeout
    )


def copy_repo(dest: Path) -> Path:
    """The files build.sh needs, copied so a test may damage them."""
    dest.mkdir()
    for name in ("build.sh", "upstream.lock.json"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("scripts", "patches", "overlay", "plugin"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def git(cwd: Path, *args: str) -> str:
    """git in `cwd` with GIT_ENV; its output."""
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout


def copy_checkout(dest: Path) -> Path:
    """The checkout's files as they are now (tracked, and untracked but not ignored)."""
    for rel in git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if rel and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def raw_member(path: Path, info: zipfile.ZipInfo) -> bytes:
    """A member's local header fields after the signature, name, extra and compressed data."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        rest = fh.read(name_len + extra_len + info.compress_size)
    return header + rest


def dist_info(zf: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
    return name


def assert_record_complete(zf: zipfile.ZipFile) -> None:
    """RECORD lists every member once, with the sha256 and size of its content."""
    record_name = f"{dist_info(zf)}/RECORD"
    rows = list(csv.reader(io.StringIO(zf.read(record_name).decode())))
    assert sorted(r[0] for r in rows) == sorted(zf.namelist())
    for path, digest, size in rows:
        if path == record_name:
            assert digest == size == ""
            continue
        data = zf.read(path)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={expected}", len(data)), path
    assert zf.testzip() is None  # every member's CRC
