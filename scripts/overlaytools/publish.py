"""Publishing a build's wheels into the output directory: all or nothing, even under SIGKILL.

For an output directory OUT (dist/ by default), beside it in the same parent:
  .OUT.lock           flock'ed while a build cleans up, starts staging or publishes;
  .OUT.staging-XXXX/  one per running build, flock'ed by that build while it lives.

A build writes its wheels into its staging directory. To publish, under the
lock, it hard-links there every other file of OUT (the wheels of the current label it did not
rebuild), writes SHA256SUMS for exactly the staged wheels, and then swaps the
two directories with one renameat2(RENAME_EXCHANGE) call. Until that call OUT
is the old directory, after it the new one; no instant shows a mix, so a kill
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
from contextlib import contextmanager
from pathlib import Path

from .errors import OverlayError
from .fetch import log, sha256_of

SUMS = "SHA256SUMS"
# Test hook: the build stops itself (SIGSTOP) at the stage this names, so a test
# can signal it there: before-staging, staging, staged or published.
STOP_AT_ENV = "VLLM_OVERLAY_STOP_AT"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Directories builds before this scheme left inside OUT.
_OLD_STAGING = ".staging-"


def checkpoint(stage: str) -> None:
    if os.environ.get(STOP_AT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


class Staging:
    """A build's staging directory beside `out`, and its publication."""

    def __init__(self, out: Path) -> None:
        self.out = Path(os.path.abspath(out))
        if self.out.is_symlink():  # publish where it points, keeping the link
            self.out = self.out.resolve()
        self.lock = self.out.with_name(f".{self.out.name}.lock")
        self.prefix = f".{self.out.name}.staging-"
        self.published = 0  # wheels in OUT from this build, once swapped in
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Staging:
        if self.out.exists() and not self.out.is_dir():
            raise OverlayError(f"--out-dir {self.out} exists and is not a directory")
        if self.out.is_dir() and not os.access(self.out, os.W_OK):
            raise OverlayError(f"--out-dir {self.out} is not writable")
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
        for path in stale:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running build's
            finally:
                os.close(fd)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path} ({size / 1e6:.0f} MB), left by an interrupted build")

    def publish(self, built: dict[str, str], current: set[str]) -> None:
        """Swap in OUT's files plus the `built` wheels (name -> sha256) with their SHA256SUMS.
        OUT's other wheels of the distributions in `current` stay only if `current` names
        them: an earlier label's do not. Wheels of other distributions stay."""
        ours = {name.split("-", 1)[0] for name in current}
        with self._locked():
            sums = dict(built)
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
                if entry.name.split("-", 1)[0] in ours and entry.name not in current:
                    dropped.append(entry.name)
                    continue
                _link_or_copy(Path(entry.path), self.path / entry.name)
                if entry.name.endswith(".whl"):
                    with open(entry.path, "rb") as handle:
                        sums[entry.name] = sha256_of(handle)
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
