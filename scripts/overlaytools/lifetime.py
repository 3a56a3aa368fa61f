"""What a killed tool leaves behind: its children die with it, and the directories it was
working in are flock'ed while it lives, so the next run removes (and names) those nobody holds.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A subprocess preexec_fn: the child gets SIGKILL when this process dies (Linux)."""
    parent = os.getpid()

    def arm() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm


def remove_unheld(paths: Iterable[Path]) -> None:
    """Remove each directory that no live process holds the flock of, naming it."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running build's
        finally:
            os.close(fd)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(path, ignore_errors=True)
        print(
            f"removed {path} ({size / 1e6:.0f} MB), left by an interrupted build", file=sys.stderr, flush=True
        )


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new directory `prefix`* in TMPDIR, flock'ed while it is used and removed after;
    first removes those of killed runs."""
    parent = Path(tempfile.gettempdir())
    with open(parent / f".{prefix}lock", "a") as held:  # no cleanup while another starts
        fcntl.flock(held, fcntl.LOCK_EX)
        remove_unheld(sorted(parent.glob(f"{prefix}*")))
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
