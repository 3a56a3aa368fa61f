"""The plugin's startup hook (vllm_moe_overlay.pth, _vllm_moe_overlay.py) in real
interpreters: it runs at the start of every Python of the environment, so it must cost
next to nothing, import nothing heavy, survive any fault with at most one stderr line
(and only once a vLLM module is looked up), work on every Python from 3.9 to 3.13, and
leave with `pip uninstall`.

A real virtual environment (made with `python -m venv`, the plugin installed by its
pip) for what pip does; elsewhere the installed plugin's folder, copied and damaged
where a test needs it, read as a site directory (plugin_helpers.plugin_site).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from build_helpers import interpreter
from plugin_helpers import PLUGIN_WHEEL, installed_plugin, plugin_site, pristine_plugin_path, pristine_vllm
from series_helpers import MODULES as TARGETS
from serve_helpers import VENV

HOOK = "_vllm_moe_overlay"
PTH = "vllm_moe_overlay.pth"
STDERR_TAG = "vllm-moe-overlay: startup hook: nothing served: "
VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13")  # the tools' range (README), vLLM 0.19.1's and one below


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points Python at other packages."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def imported_at_start(python: str, env: dict[str, str]) -> set[str]:
    """The modules `python -X importtime -c pass` imports."""
    result = run([python, "-X", "importtime", "-c", "pass"], env)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", result.stderr, re.M))


# ---- a real virtual environment, pip installing and removing the plugin ---------------


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
    return root


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3*/site-packages")
    return found


def test_pip_install_runs_the_hook_at_start_and_uninstall_removes_it_all(venv):
    python, env = str(venv / "bin/python"), clean_env()
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    site = site_packages(venv)
    before = {p.relative_to(site) for p in site.iterdir()}
    plain = imported_at_start(python, env)

    installed = run([*pip, "install", "--no-index", "--no-deps", str(PLUGIN_WHEEL)], env)
    assert installed.returncode == 0, installed.stderr
    assert (site / PTH).is_file() and (site / f"{HOOK}.py").is_file()
    # Python's own startup, the hook's module the only addition: no json, torch or vLLM.
    assert imported_at_start(python, env) - plain == {HOOK}
    finders = run([python, "-c", "import sys; print([type(f).__module__ for f in sys.meta_path])"], env)
    assert HOOK in finders.stdout, finders.stdout + finders.stderr
    for command in ([python, "-c", "pass"], [*pip, "--version"]):
        result = run(command, env)
        assert (result.returncode, result.stderr) == (0, ""), command
    # No vLLM here: importing it fails as it would without the plugin, which says nothing.
    result = run([python, "-c", "import vllm"], env)
    assert result.returncode == 1 and "No module named 'vllm'" in result.stderr
    assert "vllm-moe-overlay" not in result.stderr
    check = run([python, "-m", "vllm_moe_overlay"], env)
    assert check.returncode == 1 and f"vLLM: NOT installed for {python}" in check.stdout, check.stdout

    removed = run([*pip, "uninstall", "-y", "vllm-moe-overlay"], env)
    assert removed.returncode == 0, removed.stderr
    left = {p.relative_to(site) for p in site.iterdir()} - before
    assert left == set(), left
    assert not [p for p in site.rglob("*") if "vllm_moe_overlay" in p.name], "files left behind"
    assert imported_at_start(python, env) == plain
    finders = run([python, "-c", "import sys; print([type(f).__module__ for f in sys.meta_path])"], env)
    assert HOOK not in finders.stdout


# ---- faults: the test environment's Python with pristine vLLM and a damaged plugin ------


@pytest.fixture
def plugin_copy(tmp_path) -> Path:
    """A copy of the installed plugin's folder, for a test to damage."""
    copy = tmp_path / "plugin"
    shutil.copytree(installed_plugin(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def plugin_env(plugin: Path) -> dict[str, str]:
    """Pristine vLLM + the plugin folder `plugin` as a site directory."""
    return clean_env(PYTHONPATH=f"{pristine_vllm()}{os.pathsep}{plugin_site(plugin)}")


def damage_manifest(plugin: Path) -> None:
    manifest = plugin / "vllm_moe_overlay/manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])  # cut mid-string


def manifest_is_a_folder(plugin: Path) -> None:
    """Unreadable: as root no file mode keeps this process out, a folder does."""
    manifest = plugin / "vllm_moe_overlay/manifest.json"
    manifest.unlink()
    manifest.mkdir()


def packaged_file_is_gone(plugin: Path) -> None:
    (plugin / "vllm_moe_overlay/files" / next(iter(TARGETS.values()))).unlink()


def hook_does_not_parse(plugin: Path) -> None:
    (plugin / f"{HOOK}.py").write_text("def (:\n")


def hook_is_gone(plugin: Path) -> None:
    (plugin / f"{HOOK}.py").unlink()


FAULTS = {
    "damaged-manifest": (damage_manifest, True),
    "unreadable-manifest": (manifest_is_a_folder, True),
    "packaged-file-gone": (packaged_file_is_gone, True),
    "hook-does-not-parse": (hook_does_not_parse, False),  # not even the one line: no hook
    "hook-gone": (hook_is_gone, False),
}
IMPORT_VLLM = """
import importlib.util, json, sys, vllm
print(json.dumps({m: importlib.util.find_spec(m).origin for m in json.loads(sys.argv[1])}))
"""


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_leaves_python_running_unchanged_with_at_most_one_line(plugin_copy, fault):
    damage, says = FAULTS[fault]
    damage(plugin_copy)
    env, python = plugin_env(plugin_copy), str(VENV / "bin/python")
    for command in (
        [python, "-c", "pass"],
        [python, "-m", "pip", "--disable-pip-version-check", "--version"],
    ):
        result = run(command, env)
        assert (result.returncode, result.stderr) == (0, ""), (command, result.stderr)
    result = run([python, "-c", IMPORT_VLLM, json.dumps(list(TARGETS))], env)
    assert result.returncode == 0, result.stderr
    ours = [ln for ln in result.stderr.splitlines() if "vllm-moe-overlay" in ln]
    assert len(ours) == (1 if says else 0), result.stderr
    if says:
        assert ours[0].startswith(STDERR_TAG)
    # Nothing served: vLLM runs its own files.
    origins = json.loads(result.stdout.splitlines()[-1])
    assert origins == {m: str(pristine_vllm() / rel) for m, rel in TARGETS.items()}


ODD_PATH = """
import importlib.util, json, sys
sys.path += ["/nonexistent", "/dev/null", "", "not/absolute"]
modules = json.loads(sys.argv[1])
print(json.dumps({m: importlib.util.find_spec(m).origin for m in modules}))
"""


def test_odd_sys_path_and_no_writable_cache_change_nothing():
    """sys.path with entries that are missing, a file, empty and relative, on PYTHONPATH
    and added later; and nowhere to write bytecode (as on a read-only site directory;
    as root no file mode stops this process, so the cache prefix is under a file)."""
    path = os.pathsep.join([pristine_plugin_path(), "/nonexistent", "/dev/null"])
    env = clean_env(PYTHONPATH=path, PYTHONPYCACHEPREFIX="/dev/null/no-cache")
    result = run([str(VENV / "bin/python"), "-c", ODD_PATH, json.dumps(list(TARGETS))], env)
    assert result.returncode == 0 and "vllm-moe-overlay" not in result.stderr, result.stderr
    files = installed_plugin() / "vllm_moe_overlay/files"
    origins = json.loads(result.stdout.splitlines()[-1])  # after vLLM's log lines
    assert origins == {m: str(files / rel) for m, rel in TARGETS.items()}


# ---- every Python from 3.9 to 3.13 ---------------------------------------------------

EVERY_PYTHON = """
import importlib.util, json, sys
print(json.dumps({m: importlib.util.find_spec(m).origin for m in json.loads(sys.argv[1])}))
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_every_python_starts_unchanged_and_gets_the_modules_served(version, tmp_path, plugin_copy):
    """No vLLM runs on these Pythons here: a tree of the release's files of the series (a
    namespace package, no vllm/__init__.py) is what the hook reads and serves over; the
    lookup (find_spec) is what Python's import system asks the hook, without running
    vLLM's code."""
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (python{version} on PATH or a pyenv install)")
    tree = tmp_path / "release"
    for rel in TARGETS.values():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pristine_vllm() / rel, tree / rel)
    env = clean_env(PYTHONPATH=f"{tree}{os.pathsep}{plugin_site(plugin_copy)}", PYTHONDONTWRITEBYTECODE="1")
    for command in ([python, "-c", "pass"], [python, "-c", "import json, sys"]):
        result = run(command, env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr
    found = run([python, "-c", "import sys; print([type(f).__module__ for f in sys.meta_path])"], env)
    assert HOOK in found.stdout, found.stdout + found.stderr
    result = run([python, "-c", EVERY_PYTHON, json.dumps(list(TARGETS))], env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    files = plugin_copy / "vllm_moe_overlay/files"
    assert json.loads(result.stdout) == {m: str(files / rel) for m, rel in TARGETS.items()}
