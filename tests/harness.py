"""The test harness: tests/run (the test command) and tests/test-env (the test environment).

tests/run [pytest args] builds the wheels (build.sh), prepares the cached test
environment and runs pytest on tests/ in it. `tests/run --fast [pytest args]`:
only the tests marked fast, in the tools environment (tools-requirements.txt:
pytest, ruff, setuptools, packaging), with no build and no test environment.
tests/test-env [--cuda] prepares the environment and prints its path
(progress goes to stderr); --cuda adds the CUDA wheel's own requirements (for a
host with an NVIDIA GPU).

The environment is a virtual environment with torch 2.10.0, vLLM 0.19.1's
requirements and the patched wheels, one per (Python, constraints, requirements)
under the cache directory, shared by every checkout and flock'ed while it is
prepared; each wheel is installed once per content.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(REPO / "scripts"))

from overlaytools import fetch, lock, rewheel  # noqa: E402
from overlaytools.errors import OverlayError, run  # noqa: E402
from wheel_requires import runtime_requirements  # noqa: E402

CONSTRAINTS = TESTS / "constraints.txt"
TOOLS_REQUIREMENTS = TESTS / "tools-requirements.txt"
# The test environments this process uses, each under a shared lock for as long as it runs:
# another checkout's run installs its own patched wheels only once they are released.
IN_USE: list = []
EXIT_NO_TESTS = 5  # pytest's status when it collected nothing
STDERR = 2  # progress goes to the file descriptor, which pytest's capture also redirects


def say(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return fetch.sha256_of(handle)


def once(stamp: Path, digest: str, action: Callable[[], None]) -> None:
    """Run `action` unless `stamp` records `digest`; record it after a success."""
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return
    action()
    stamp.write_text(digest + "\n")


def pip_install_target(python: str, wheel: Path, target: Path, digest: str) -> Path:
    """`wheel` installed with `python`'s pip --target at `target`, once per digest;
    staged and renamed under a lock, so concurrent callers are safe."""
    with open(f"{target}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stamp = target / ".sha256"
        if not stamp.is_file() or stamp.read_text() != digest:
            staging = Path(f"{target}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            _run(
                [
                    python,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-deps",
                    "--no-index",
                    "--disable-pip-version-check",
                    "--target",
                    str(staging),
                    str(wheel),
                ]
            )
            (staging / ".sha256").write_text(digest)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


def patched_wheels() -> dict[str, Path]:
    """flavour -> this machine's patched wheel of the lock's current label in dist/
    (dist/ may still hold an earlier label's)."""
    locked = lock.load()
    found = {}
    for flavour in lock.FLAVOURS:
        (artifact,) = locked.wheels(locked.pin, [flavour], [platform.machine()])
        found[flavour] = REPO / "dist" / rewheel.patched_filename(locked, artifact, locked.pin)
    missing = [str(path.relative_to(REPO)) for path in found.values() if not path.is_file()]
    if missing:
        raise OverlayError(f"no {' or '.join(missing)} (the build wrote none)")
    return found


def tools_python(prog: str) -> str:
    """The Python that runs build.sh and the fast lane: $PYTHON if set, else a cached
    virtual environment with TOOLS_REQUIREMENTS (this Python's own setuptools may be too
    old, and it may have no pytest)."""
    if "PYTHON" in os.environ:
        return os.environ["PYTHON"]
    version = subprocess.run([sys.executable, "-VV"], capture_output=True, check=True).stdout
    key = hashlib.sha256(version + TOOLS_REQUIREMENTS.read_bytes()).hexdigest()[:16]
    venv = fetch.default_cache_dir() / "venvs" / f"tools-{key}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            say(prog, f"creating the tools environment {venv} ({TOOLS_REQUIREMENTS.name})")
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)])
            _run(
                [
                    str(venv / "bin/python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "-r",
                    str(TOOLS_REQUIREMENTS),
                ]
            )
            (venv / ".complete").touch()
    return str(venv / "bin/python")


def prepare_env(cuda: bool = False, prog: str = "tests/test-env") -> Path:
    """Build the wheels, prepare the test environment; its path."""
    subprocess.run(
        [str(REPO / "build.sh"), "--flavour", "all", "--arch", "all"],
        stdout=STDERR,
        check=True,
        env={**os.environ, "PYTHON": tools_python(prog)},
    )
    wheels = patched_wheels()
    requirements = "\n".join(runtime_requirements(str(wheels["cpu"]))) + "\n"
    version = subprocess.run([sys.executable, "-VV"], capture_output=True, check=True).stdout
    key = hashlib.sha256(version + CONSTRAINTS.read_bytes() + requirements.encode()).hexdigest()[:16]
    venvs = fetch.default_cache_dir() / "venvs"
    venvs.mkdir(parents=True, exist_ok=True)
    venv = venvs / key
    pip = [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check"]
    constrained = [*pip, "install", "-c", str(CONSTRAINTS)]
    with open(f"{venv}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            say(
                prog,
                f"creating the test environment {venv} (torch 2.10.0 and vLLM's requirements; a few minutes)",
            )
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)])
            _run([*constrained, "-q", "pip"])
            _run([*constrained, "torch==2.10.0", "torchvision==0.25.0"])
            (venv / "runtime-requirements.txt").write_text(requirements)
            _run(
                [
                    *constrained,
                    "-r",
                    str(venv / "runtime-requirements.txt"),
                    "-r",
                    str(TESTS / "requirements.txt"),
                ]
            )
            (venv / ".complete").touch()
        else:
            say(prog, f"reusing the test environment {venv}")
        if cuda:
            listing = venv / "cuda-requirements.txt"
            listing.write_text("\n".join(runtime_requirements(str(wheels["cuda"]))) + "\n")
            say(prog, "the CUDA wheel's requirements")
            once(
                venv / ".cuda-requirements",
                sha256_file(listing),
                lambda: _run([*constrained, "-r", str(listing)]),
            )
        # The patched wheels themselves: installed again only when they changed, and then
        # only once no run of other checkouts' wheels is using the environment.
        say(prog, "the patched wheels")
        in_use = open(venv / ".in-use", "w")  # noqa: SIM115 (held until this process ends)
        digests = {flavour: sha256_file(wheel) for flavour, wheel in wheels.items()}
        stamps = {"cpu": venv / ".cpu-wheel", "cuda": venv / "cuda-flavour" / ".sha256"}
        if any(not stamps[f].is_file() or stamps[f].read_text().strip() != digests[f] for f in stamps):
            say(prog, "waiting for runs of other wheels in this environment to end")
            fcntl.flock(in_use, fcntl.LOCK_EX)
        once(
            stamps["cpu"],
            digests["cpu"],
            lambda: _run([*pip, "install", "-q", "--no-deps", "--force-reinstall", str(wheels["cpu"])]),
        )
        # The CUDA-flavour wheel goes beside the environment: tests put it first on PYTHONPATH.
        pip_install_target(str(venv / "bin/python"), wheels["cuda"], venv / "cuda-flavour", digests["cuda"])
        fcntl.flock(in_use, fcntl.LOCK_SH)  # released when this process (the test run) ends
        IN_USE.append(in_use)
    return venv


def _run(command: list[str]) -> None:
    subprocess.run(command, stdout=STDERR, check=True)


def _pytest(python: str, args: list[str], env: dict[str, str], prog: str) -> int:
    status = subprocess.run([python, "-m", "pytest", *args], cwd=REPO, env=env).returncode
    if status == EXIT_NO_TESTS:
        say(prog, "error: pytest collected no tests")
    return status


def run_tests(argv: list[str], prog: str = "tests/run") -> int:
    """The test command; its exit status is pytest's."""
    if argv[:1] == ["--fast"]:
        python = _tool(prog, lambda: tools_python(prog))
        if python is None:
            return 1
        if subprocess.run([python, "-c", "import pytest"], capture_output=True).returncode:
            say(prog, f"error: the fast lane needs pytest for {python}")
            return 1
        # An empty artifact cache and no package index: a fast test that needs
        # either fails instead of fetching.
        with tempfile.TemporaryDirectory(prefix="fast-lane-") as scratch:
            env = {k: v for k, v in os.environ.items() if k != "VLLM_OVERLAY_VENV"}
            env.update(VLLM_OVERLAY_CACHE=scratch, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
            return _pytest(python, ["-p", "no:cacheprovider", "-m", "fast", *argv[1:]], env, prog)
    venv = _tool(prog, lambda: prepare_env(prog=prog))
    if venv is None:
        return 1
    # The tests run build.sh too: with the Python that built the wheels.
    env = {
        **os.environ,
        "VLLM_OVERLAY_VENV": str(venv),
        "VLLM_OVERLAY_CACHE": str(fetch.default_cache_dir()),
        "PYTHON": tools_python(prog),
    }
    return _pytest(str(venv / "bin/python"), argv, env, prog)


def env_main(argv: list[str], prog: str = "tests/test-env") -> int:
    if argv not in ([], ["--cuda"]):
        say(prog, f"error: unknown argument {argv[0]} (usage: {prog} [--cuda])")
        return 2
    venv = _tool(prog, lambda: prepare_env(cuda=bool(argv), prog=prog))
    if venv is None:
        return 1
    print(venv)
    return 0


def _tool(prog: str, action: Callable[[], Path]) -> Path | None:
    """`action`'s result, or None after one line on stderr saying why it failed."""
    result: list[Path] = []

    def act() -> None:
        try:
            result.append(action())
        except subprocess.CalledProcessError as exc:
            raise OverlayError(
                f"{Path(exc.cmd[0]).name} failed (exit {exc.returncode}); its output is above"
            ) from None

    status = run(prog, act, lambda: "the test environment is rebuilt or completed on the next run")
    return result[0] if status == 0 else None
