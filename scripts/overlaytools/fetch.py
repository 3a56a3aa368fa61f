"""Fetch locked artifacts through pip into a shared cache, verified by sha256."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from . import lifetime
from .buildenv import add_cache_options, default_cache_dir  # noqa: F401 - the tools' cache options
from .errors import OverlayError
from .lock import Artifact

CHUNK = 8 << 20


def pip_failure(result: subprocess.CompletedProcess) -> str:
    """The line of a failed pip run that says why: its last ERROR line if any."""
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    return (errors or result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_of(fileobj: BinaryIO) -> str:
    fileobj.seek(0)
    digest = hashlib.sha256()
    while chunk := fileobj.read(CHUNK):
        digest.update(chunk)
    fileobj.seek(0)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock, so concurrent builds share one cache safely."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_cache(cache_dir: Path, artifacts: list[Artifact], offline: bool) -> None:
    """Refuse, before anything is written, a cache or cached file of the wrong kind, and
    under --offline a missing one."""
    store = cache_dir / "artifacts"
    for folder in (cache_dir, store):
        if os.path.lexists(folder) and not folder.is_dir():
            raise OverlayError(f"cache {folder} is not a directory")
    for artifact in artifacts:
        path = store / artifact.filename
        if os.path.lexists(path) and not path.is_file():
            raise OverlayError(f"{path} in the cache is not a file: remove it")
        if offline and not path.is_file():
            raise OverlayError(f"{artifact.filename} is not in the cache {store} (--offline)")


def open_verified(artifact: Artifact, version: str, cache_dir: Path, offline: bool) -> BinaryIO:
    """An open handle on the cached artifact, fetched if absent and checked by size and
    sha256.

    The caller reads from this handle only, so a later change to the cache
    file cannot alter what was verified. A cached file that fails the check is
    left alone (a wrong lock must not cost a good file): a verified download
    replaces it, and a failed download is discarded.
    """
    check_cache(cache_dir, [artifact], offline)
    store = cache_dir / "artifacts"
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OverlayError(f"cannot create the cache {store}: {exc.strerror}") from None
    path = store / artifact.filename
    with _locked(store / f".{artifact.filename}.lock"):
        _remove_stale_fetches(store, artifact.filename)
        if os.path.lexists(path):
            check_cache(cache_dir, [artifact], offline)
            handle = open(path, "rb")
            mismatch = _mismatch(handle, artifact, f"{path}:")
            if mismatch is None:
                return handle
            handle.close()
            if offline:
                raise OverlayError(
                    f"{mismatch}; not used and kept (--offline): run without "
                    "--offline to replace it with a verified download"
                )
            log(f"  {mismatch}; fetching it afresh")
        elif offline:
            raise OverlayError(f"{artifact.filename} is not in the cache {store} (--offline)")
        return _download(artifact, version, store)


def _mismatch(handle: BinaryIO, artifact: Artifact, what: str) -> str | None:
    """Why the open file is not the artifact the lock names, or None; refuses a lock whose
    size (0: unknown) disagrees with the file of its sha256."""
    actual = sha256_of(handle)
    if actual != artifact.sha256:
        return f"{what} sha256 {actual} does not match {artifact.hash_from}'s {artifact.sha256}"
    size = os.fstat(handle.fileno()).st_size
    if artifact.size and size != artifact.size:
        handle.close()
        raise OverlayError(
            f"{what} sha256 matches, but it has {size} bytes and {artifact.hash_from} says "
            f"{artifact.size}: correct the lock's size"
        )
    return None


def _fetch_prefix(filename: str) -> str:
    return f".fetch-{filename}-"


def _remove_stale_fetches(store: Path, filename: str) -> None:
    """pip's download directories of this artifact left by a killed run. Only the
    holder of the artifact's lock downloads it, so under that lock any is stale."""
    for stale in store.glob(_fetch_prefix(filename) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
        log(f"  removed {stale}, left by an interrupted download")


def _download(artifact: Artifact, version: str, store: Path) -> BinaryIO:
    """Download the artifact into the cache; an open handle on it once verified."""
    if not artifact.is_wheel:
        raise OverlayError(
            f"{artifact.filename}: only wheels are fetched by this tool "
            "(pip cannot download vLLM's sdist without building it)"
        )
    size = f" ({artifact.size / 1e6:.0f} MB)" if artifact.size else ""
    log(f"  fetching {artifact.filename}{size} with pip")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=store, prefix=_fetch_prefix(artifact.filename)) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            *artifact.pip_target(),
            f"{artifact.project}=={version}",
        ]
        result = subprocess.run(
            cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, preexec_fn=lifetime.die_with_parent()
        )
        if result.returncode != 0:
            raise OverlayError(f"pip could not download {artifact.filename}: {pip_failure(result)}")
        fetched = Path(tmp) / artifact.filename
        if not fetched.is_file():
            got = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            raise OverlayError(f"pip download gave {got}, not {artifact.filename}")
        handle = open(fetched, "rb")
        mismatch = _mismatch(handle, artifact, f"downloaded {artifact.filename}:")
        if mismatch is not None:
            handle.close()
            raise OverlayError(f"{mismatch}; discarded the download")
        os.replace(fetched, store / artifact.filename)  # the handle follows the file
    log(f"  fetched {artifact.filename} in {time.monotonic() - started:.1f} s")
    return handle
