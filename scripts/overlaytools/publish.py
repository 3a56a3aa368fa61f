"""Publishing a build's wheels into the output directory: all or nothing, even under SIGKILL.

For an output directory OUT (dist/ by default), beside it in the same parent:
  .OUT.lock           flock'ed while a build cleans up, starts staging or publishes;
  .OUT.staging-XXXX/  one per running build, flock'ed by that build while it lives.

A build writes its wheels into its staging directory. To publish, under the
lock, it hard-links there every other file of OUT (the wheels it did not rebuild, except those
this overlay published under an earlier label), writes SHA256SUMS for exactly the staged
wheels, and then swaps the two directories with one renameat2(RENAME_EXCHANGE) call. Until
that call OUT is the old directory, after it the new one; no instant shows a mix, so a kill
anywhere leaves OUT holding the old set or the new one, each with its own
SHA256SUMS. The old set, now at the staging path, is deleted last. A staging
directory nobody holds the flock of was left by a killed build: the next build
deletes it and says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from . import lifetime
from .errors import OverlayError
from .fetch import log, sha256_of

SUMS = "SHA256SUMS"
# Test hook: the build stops itself (SIGSTOP) at the stage this names, so a test
# can signal it there: before-staging, staging, staged, published or finished (all done).
STOP_AT_ENV = "VLLM_OVERLAY_STOP_AT"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Directories builds before this scheme left inside OUT.
_OLD_STAGING = ".staging-"


def checkpoint(stage: str) -> None:
    if os.environ.get(STOP_AT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def target(out: Path) -> Path:
    """The directory a build publishes into: `out` made absolute, or where a symlink
    `out` points (the link is kept)."""
    out = Path(os.path.abspath(out))
    return out.resolve() if out.is_symlink() else out


def check_out(out: Path, cache: Path) -> None:
    """Refuse, before anything is written, an output directory the build cannot use: not a
    directory, not writable, or the artifact cache or a folder in it (publishing replaces
    the directory whole and removes wheels from it)."""
    out = target(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OverlayError(f"--out-dir {out} exists and is not a directory")
    if out.is_dir() and not os.access(out, os.W_OK):
        raise OverlayError(f"--out-dir {out} is not writable")
    parent = out.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OverlayError(f"cannot stage beside --out-dir {out}: {parent} is not a writable directory")
    cache = Path(os.path.realpath(cache))
    real = Path(os.path.realpath(out))
    if real == cache or cache in real.parents:
        raise OverlayError(
            f"--out-dir {out} is inside the artifact cache {cache}: choose a directory outside it"
        )


class Staging:
    """A build's staging directory beside `out`, and its publication."""

    def __init__(self, out: Path) -> None:
        self.out = target(out)
        self.lock = self.out.with_name(f".{self.out.name}.lock")
        self.prefix = f".{self.out.name}.staging-"
        self.published = 0  # wheels in OUT from this build, once swapped in
        self.finished = False  # and the old set removed
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Staging:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._remove_stale()
                self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.out.parent))
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise OverlayError(f"cannot stage beside --out-dir {self.out}: {exc.strerror}") from None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)  # unpublished wheels, or the old set
        if self._fd is not None:
            os.close(self._fd)

    @contextmanager
    def _locked(self):
        with open(self.lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            yield

    def _remove_stale(self) -> None:
        """Staging directories of killed builds: no live build holds their flock."""
        stale = list(self.out.parent.glob(self.prefix + "*"))
        if self.out.is_dir():
            stale += [p for p in self.out.glob(_OLD_STAGING + "*") if p.is_dir()]
        lifetime.remove_unheld(stale)

    def publish(self, built: dict[str, str], earlier: Callable[[str], bool]) -> None:
        """Swap in OUT's files plus the `built` wheels (name -> sha256) with their SHA256SUMS.
        A wheel of OUT is dropped only if this overlay published it under an earlier label:
        `earlier` accepts its name, and OUT's SHA256SUMS (which a build wrote) lists it with
        the sha256 it still has. Every other file stays."""
        with self._locked():
            sums = dict(built)
            listed = _listed(self.out / SUMS)
            dropped = []
            for entry in sorted(os.scandir(self.out), key=lambda e: e.name) if self.out.is_dir() else []:
                if entry.name in built or entry.name in (SUMS, ".lock"):
                    continue  # replaced, rewritten, or the lock of builds before this scheme
                if entry.is_dir(follow_symlinks=False) and entry.name.startswith(_OLD_STAGING):
                    continue  # removed with the old set
                if not entry.is_file(follow_symlinks=False):
                    raise OverlayError(
                        f"{entry.path} is not a regular file; the build replaces "
                        f"{self.out} whole, so move it elsewhere"
                    )
                digest = None
                if entry.name.endswith(".whl"):
                    with open(entry.path, "rb") as handle:
                        digest = sha256_of(handle)
                if digest is not None and earlier(entry.name) and listed.get(entry.name) == digest:
                    dropped.append(entry.name)
                    continue
                _link_or_copy(Path(entry.path), self.path / entry.name)
                if digest is not None:
                    sums[entry.name] = digest
            (self.path / SUMS).write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
            mode = self.out.stat().st_mode if self.out.is_dir() else 0o777 & ~_umask()
            os.chmod(self.path, mode & 0o7777)  # mkdtemp made it 0700
            checkpoint("staged")
            # No signal between the swap and recording it, so the report is true.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                if self.out.is_dir():
                    _exchange(self.path, self.out)
                else:
                    os.rename(self.path, self.out)
                    self.path = None
                self.published = len(built)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            checkpoint("published")
            if dropped:
                log(f"dropped {len(dropped)} wheel(s) of another label from {self.out}: {', '.join(dropped)}")
            if self.path is not None:  # the old set
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None
            self.finished = True


def _listed(sums: Path) -> dict[str, str]:
    """name -> sha256 of a SHA256SUMS file (none if absent or unreadable)."""
    try:
        lines = sums.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    return {name: digest for digest, _, name in (ln.partition("  ") for ln in lines) if name}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OverlayError("publishing needs renameat2 (Linux, glibc >= 2.28), which this C library lacks")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS):
            raise OverlayError(
                f"the file system of {b} cannot swap directories atomically "
                "(renameat2 RENAME_EXCHANGE); use an --out-dir on a local "
                "file system"
            )
        raise OSError(code, os.strerror(code), str(b))
