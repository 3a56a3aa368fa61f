"""build.sh's own build environment (build-requirements.txt, scripts/overlaytools/buildenv.py):
made from a Python whatever setuptools it has, without changing that Python; rebuilt when a
creation was killed or a file of it is gone; --offline without it is one line.

Each test has a private cache (the upstream wheels hard-linked from the shared one) in
which build.sh makes the environment: pip fetches packaging and setuptools from the package
index, about 10 s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from build_helpers import DIST, LOCK, REPO, cache_dir, run_build
from test_python_versions import interpreter

PLUGIN = ["--flavour", "plugin", "--arch", "x86_64"]
PLUGIN_WHEEL = f"vllm_moe_overlay-{LOCK.pin}+{LOCK.label}-py3-none-any.whl"


def private_cache(tmp_path: Path) -> Path:
    """A cache holding the x86_64 upstream wheels the plugin is built from, and nothing else."""
    store = tmp_path / "cache" / "artifacts"
    store.mkdir(parents=True)
    for artifact in LOCK.wheels(LOCK.pin, ["cuda", "cpu"], ["x86_64"]):
        source = cache_dir() / "artifacts" / artifact.filename
        try:
            os.link(source, store / artifact.filename)
        except OSError:
            shutil.copy(source, store / artifact.filename)
    return tmp_path / "cache"


def setuptools_of(python: Path) -> str:
    found = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('setuptools'))"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() if found.returncode == 0 else "none"


def user_python(tmp_path: Path, setuptools: str) -> Path:
    """A virtual environment as users have them: Python 3.11's venv brings setuptools 65.5.0
    (ensurepip's), --without-pip has none (like a fresh venv of Python 3.12 or later)."""
    base = interpreter("3.11")
    if base is None:
        pytest.skip("no Python 3.11 here (python3.11 on PATH or a pyenv install)")
    flags = [] if setuptools == "65.5.0" else ["--without-pip"]
    subprocess.run([base, "-m", "venv", *flags, str(tmp_path / "user")], check=True)
    python = tmp_path / "user" / "bin" / "python"
    assert setuptools_of(python) == setuptools
    return python


def build(python: Path, cache: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_build(
        *PLUGIN, *flags, "--cache-dir", str(cache), "--out-dir", str(out), env={"PYTHON": str(python)}
    )


def build_envs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "venvs").glob("build-*") if p.is_dir())


@pytest.mark.parametrize("setuptools", ["65.5.0", "none"])
def test_build_from_a_python_with_old_or_no_setuptools(tmp_path, setuptools):
    """The README's first command, on a Python whose setuptools cannot build the plugin
    wheel (older than 70.1, or absent): build.sh makes its environment, says so, builds the
    very wheel of dist/, and leaves that Python as it was."""
    python = user_python(tmp_path, setuptools)
    cache, out = private_cache(tmp_path), tmp_path / "out"
    result = build(python, cache, out)
    assert result.returncode == 0, result.stderr
    (env,) = build_envs(cache)
    assert f"build.sh: creating the build environment {env}" in result.stderr
    assert "from the package index" in result.stderr
    assert (out / PLUGIN_WHEEL).read_bytes() == (DIST / PLUGIN_WHEEL).read_bytes()
    assert setuptools_of(python) == setuptools

    again = build(python, cache, out, "--offline")  # reused, offline too
    assert again.returncode == 0, again.stderr
    assert "build environment" not in again.stderr
    assert build_envs(cache) == [env]


def _deleted_file(env: Path) -> str:
    (victim,) = env.glob("lib/python*/site-packages/setuptools/build_meta.py")
    victim.unlink()
    return f"{victim} is missing"


def _no_stamp(env: Path) -> str:
    (env / ".complete").unlink()
    return "its creation did not finish"


@pytest.mark.parametrize("damage", [_deleted_file, _no_stamp])
def test_damaged_build_env_is_rebuilt(tmp_path, damage):
    python = user_python(tmp_path, "65.5.0")
    cache, out = private_cache(tmp_path), tmp_path / "out"
    assert build(python, cache, out).returncode == 0
    (env,) = build_envs(cache)
    why = damage(env)

    offline = build(python, cache, out, "--offline")
    assert offline.returncode == 1 and "Traceback" not in offline.stderr, offline.stderr
    (line,) = offline.stderr.strip().splitlines()
    assert line.startswith(
        f"build.sh: error: --offline, but the build environment {env} is not usable ({why})"
    )

    result = build(python, cache, out)
    assert result.returncode == 0, result.stderr
    assert f"build.sh: rebuilding the build environment {env}: {why}" in result.stderr
    assert (out / PLUGIN_WHEEL).read_bytes() == (DIST / PLUGIN_WHEEL).read_bytes()


def pids_running(marker: str) -> list[int]:
    """Live processes whose command line names `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_build_killed_while_making_its_env(tmp_path):
    """SIGKILL while pip fills the environment: pip dies with build.sh, and the next build
    rebuilds the half-made environment and builds."""
    python = user_python(tmp_path, "65.5.0")
    cache, out = private_cache(tmp_path), tmp_path / "out"
    proc = subprocess.Popen(
        [str(REPO / "build.sh"), *PLUGIN, "--cache-dir", str(cache), "--out-dir", str(out)],
        env={**os.environ, "PYTHON": str(python)},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not [
        p
        for p in pids_running(str(cache / "venvs"))
        if p != proc.pid and "pip" in Path(f"/proc/{p}/cmdline").read_text()
    ]:
        assert proc.poll() is None and time.monotonic() < deadline, "pip never ran"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pids_running(str(cache / "venvs")):
        assert time.monotonic() < deadline, "a child of the killed build.sh lives on"
        time.sleep(0.05)
    (env,) = build_envs(cache)
    result = build(python, cache, out)
    assert result.returncode == 0, result.stderr
    assert f"build.sh: rebuilding the build environment {env}: its creation did not finish" in result.stderr


def test_offline_without_a_build_env_is_one_line_and_writes_nothing(tmp_path):
    python = user_python(tmp_path, "65.5.0")
    cache, out = private_cache(tmp_path), tmp_path / "out"
    before = sorted(cache.rglob("*"))
    result = build(python, cache, out, "--offline")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("build.sh: error: --offline, but the build environment ")
    assert "(it does not exist): run once without --offline" in line
    assert sorted(cache.rglob("*")) == before and not out.exists()
