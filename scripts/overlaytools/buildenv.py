"""The build tools' environment: a virtual environment holding exactly build-requirements.txt
(installed with pip --require-hashes), cached beside the upstream artifacts and shared by
build.sh and tests/run, so the plugin wheel's bytes never depend on the user's setuptools.

Standard library only: it runs under whatever Python starts build.sh (3.9 or later, with
venv and pip), before anything is installed. `python -m overlaytools.buildenv ARGS` is
build.sh: it finds or makes the environment of this Python, then runs the build there.

An environment is complete when its stamp, written last, records the requirements file's
sha256 and every file the pinned distributions' RECORDs list is present; anything else
(a creation that was killed, a deleted file, a removed base Python) is rebuilt.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import lifetime
from .errors import OverlayError, run

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "build-requirements.txt"
PROG = "build.sh"
STAMP = ".complete"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def default_cache_dir() -> Path:
    if os.environ.get("VLLM_OVERLAY_CACHE"):
        return Path(os.environ["VLLM_OVERLAY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-moe-overlay"


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="download cache shared by the tools [$VLLM_OVERLAY_CACHE or ~/.cache/vllm-moe-overlay]",
    )
    parser.add_argument("--offline", action="store_true", help="use only the cache; never run pip download")


def pins() -> list[tuple[str, str]]:
    """(name, version) of every requirement in build-requirements.txt."""
    return _PIN.findall(REQUIREMENTS.read_text())


def _digest() -> str:
    try:
        return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    except OSError as exc:
        raise OverlayError(f"cannot read {REQUIREMENTS}: {exc.strerror}") from None


def path(cache_dir: Path) -> Path:
    """This Python's build environment in the cache: one per requirements file and Python."""
    key = hashlib.sha256(f"{_digest()}\n{sys.version}\n{sys.base_prefix}".encode()).hexdigest()[:16]
    return cache_dir / "venvs" / f"build-{key}"


def problem(env: Path) -> str | None:
    """Why `env` is not a complete build environment of this requirements file, or None."""
    stamp = env / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != _digest():
        return "its creation did not finish" if env.exists() else "it does not exist"
    if not os.path.exists(env / "bin" / "python"):  # follows the link to the base Python
        return f"{env / 'bin' / 'python'} is missing or points to no Python"
    for name, version in pins():
        dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
        records = list(env.glob(f"lib/python*/site-packages/{dist_info}/RECORD"))
        if len(records) != 1:
            return f"it has no {dist_info}"
        site = records[0].parents[1]
        for line in records[0].read_text().splitlines():
            member = line.rsplit(",", 2)[0].strip('"')
            if member and "__pycache__" not in member and not (site / member).exists():
                return f"{site / member} is missing"
    return None


def current() -> bool:
    """True when this Python is itself a complete build environment."""
    return sys.prefix != sys.base_prefix and problem(Path(sys.prefix)) is None


def python(cache_dir: Path, offline: bool, prog: str = PROG) -> Path:
    """The build environment's Python, made (or remade) first if needed. Nothing is
    created when it refuses."""
    for folder in (cache_dir, cache_dir / "venvs"):
        if os.path.lexists(folder) and not folder.is_dir():
            raise OverlayError(f"cache {folder} is not a directory")
    env = path(cache_dir)
    why = problem(env)
    if why is None:
        return env / "bin" / "python"
    if offline:
        raise OverlayError(
            f"--offline, but the build environment {env} is not usable ({why}): run once without "
            f"--offline to install {REQUIREMENTS.name} from the package index"
        )
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{env}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        why = problem(env)
        if why is not None:
            _create(env, why, held.fileno(), prog)
    return env / "bin" / "python"


def _create(env: Path, why: str, lock_fd: int, prog: str) -> None:
    names = ", ".join(f"{n} {v}" for n, v in pins())
    if env.exists():
        print(f"{prog}: rebuilding the build environment {env}: {why}", file=sys.stderr, flush=True)
        shutil.rmtree(env)
    print(
        f"{prog}: creating the build environment {env} with {sys.executable}: pip installs "
        f"{names} ({REQUIREMENTS.name}, hash-checked) from the package index",
        file=sys.stderr,
        flush=True,
    )
    # The children hold the lock too: a creation cut short stays locked until they are gone.
    _step([sys.executable, "-m", "venv", str(env)], lock_fd, "python -m venv")
    pip = [str(env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _step([*pip, "install", "--require-hashes", "-r", str(REQUIREMENTS)], lock_fd, "pip install")
    (env / STAMP).write_text(_digest() + "\n")
    why = problem(env)
    if why is not None:
        raise OverlayError(f"the new build environment {env} is not complete: {why}")


def _step(command: list[str], lock_fd: int, what: str) -> None:
    result = subprocess.run(
        command,
        stdout=sys.stderr,  # pip's progress, where the build's own goes
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(lock_fd,),
        preexec_fn=lifetime.die_with_parent(),
    )
    if result.stderr:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        said = (errors or lines or [f"exit {result.returncode}"])[-1]
        raise OverlayError(f"{what} failed for the build environment: {said}")


def reexec(prog: str) -> None:
    """Run this program (sys.argv) again under the build environment's Python, unless it
    already is that Python; its --cache-dir and --offline, if given, apply. Returns only
    when it is that Python; a failure is one line and exit 1."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_cache_options(parser)
    known, _ = parser.parse_known_args(sys.argv[1:])
    found: list[Path] = []

    def find() -> None:
        if not current():
            found.append(python(known.cache_dir or default_cache_dir(), known.offline, prog))

    status = run(prog, find, lambda: "the build environment is made again on the next run")
    if status != 0:
        sys.exit(status)
    if found:
        os.execv(found[0], [str(found[0]), *sys.argv])


def main(argv: list[str]) -> None:
    """build.sh: the build, in the build environment."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.argv = ["-m", "overlaytools.build", *argv]  # what the environment's Python runs
    reexec(PROG)
    from . import build

    sys.exit(build.main(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
