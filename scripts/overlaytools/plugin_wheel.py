"""The pure-Python plugin wheel: plugin/ (a setuptools project: the loader) staged with the
patched files (the whole series) and a manifest, then built by setuptools through its PEP 517 hook.

Reproducible: every member gets the timestamp of SOURCE_DATE_EPOCH and mode 644
whatever the umask, and nothing names the staging directory; the bytes depend only
on the inputs and the setuptools version, which build-requirements.txt pins.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

from . import gitrepo, lifetime, rewheel
from .buildenv import REQUIREMENTS
from .errors import OverlayError
from .lock import REPO

PACKAGE = "vllm_moe_overlay"
PROJECT = REPO / "plugin"
LOADER = PROJECT / PACKAGE
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01 00:00 UTC, the earliest a zip can say
# PEP 517's build_wheel hook of plugin/pyproject.toml's backend, in a fresh interpreter.
BUILD_WHEEL = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
# Staged beside the package (plugin/): the startup hook, its .pth, and build_py with the .pth.
PROJECT_FILES = ["pyproject.toml", "_vllm_moe_overlay.py", "vllm_moe_overlay.pth", "build_pth.py"]


@functools.lru_cache(maxsize=None)
def schema():
    """plugin/vllm_moe_overlay/schema.py on its own, without the package around it."""
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}_schema", LOADER / "schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def filename(version: str) -> str:
    return f"{PACKAGE}-{version}-py3-none-any.whl"


def module_name(path: str) -> str:
    """vllm/a/b.py -> vllm.a.b; refuses what an import hook cannot serve as a module."""
    parts = PurePosixPath(path).parts
    if not (path.endswith(".py") and parts[0] == "vllm" and len(parts) > 1):
        raise OverlayError(f"the plugin can serve only .py modules under vllm/, not {path}")
    names = [*parts[:-1], parts[-1][: -len(".py")]]
    if names[-1] == "__init__" or not all(n.isidentifier() for n in names):
        raise OverlayError(f"the plugin cannot serve {path}: not a plain module file")
    return ".".join(names)


class Inputs:
    """What the plugin takes from every upstream wheel; the wheels must all agree."""

    def __init__(self) -> None:
        self.pristine: dict[str, bytes] = {}
        self.patched: dict[str, bytes] = {}  # pristine + patches, checked equal to overlay/
        self.requires_python = ""
        self.first = ""

    def add(self, wheel: str, source, pristine: dict[str, bytes], patched: dict[str, bytes]) -> None:
        requires_python = _requires_python(source, wheel)
        if not self.first:
            self.first, self.requires_python = wheel, requires_python
            self.pristine, self.patched = pristine, patched
            return
        for path, data in pristine.items():
            if data != self.pristine[path]:
                raise OverlayError(f"pristine {path} differs between {self.first} and {wheel}")
        if requires_python != self.requires_python:
            raise OverlayError(f"Requires-Python differs between {self.first} and {wheel}")


def _requires_python(source, wheel: str) -> str:
    with zipfile.ZipFile(source) as zf:
        metadata = zf.read(f"{rewheel.dist_info_dir(zf)}/METADATA").decode("utf-8")
    for line in metadata.partition("\n\n")[0].splitlines():
        if line.startswith("Requires-Python: "):
            return line.split(": ", 1)[1]
    raise OverlayError(f"{wheel} has no Requires-Python")


def manifest(
    version: str, label: str, patches: list[Path], pristine: dict[str, bytes], patched: dict[str, bytes]
) -> bytes:
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    try:
        info = schema().manifest(
            vllm_version=version,
            label=label,
            carried=[
                {"name": p.name, "subject": gitrepo.read_message(p).text.partition("\n")[0]} for p in patches
            ],
            modules=[
                {
                    "module": module_name(path),
                    "path": path,
                    # None: a module the patches add, which the release does not have
                    "pristine_sha256": sha256(pristine[path]) if path in pristine else None,
                    "patched_sha256": sha256(patched[path]),
                }
                for path in sorted(patched)
            ],
        )
    except ValueError as exc:  # what schema.py refuses
        raise OverlayError(f"the plugin manifest would be refused: {exc}") from None
    return schema().dumps(info)


def setuptools_requirement() -> Requirement:
    """build-system.requires of plugin/pyproject.toml: one setuptools requirement."""
    found = re.search(r'^requires = \["([^"]+)"\]', (PROJECT / "pyproject.toml").read_text(), re.M)
    if not found:
        raise OverlayError(f"{PROJECT / 'pyproject.toml'}: no one-line build-system requires")
    return Requirement(found.group(1))


def check_backend() -> None:
    """Refuse up front a setuptools that cannot build the plugin wheel: the build
    environment's is build-requirements.txt's pin, which pyproject.toml must accept."""
    needed = setuptools_requirement()
    try:
        found = importlib.metadata.version(needed.name)
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found is None or not needed.specifier.contains(found, prereleases=True):
        raise OverlayError(
            f"the plugin wheel needs {needed} ({PROJECT.name}/pyproject.toml), but {sys.executable} "
            f"has setuptools {found or 'none'}: pin one it accepts in {REQUIREMENTS.name}"
        )


def write(out: Path, version: str, label: str, patches: list[Path], inputs: Inputs) -> None:
    """The plugin wheel `version` (release+label), at `out`."""
    staged = {
        **{name: (PROJECT / name).read_bytes() for name in PROJECT_FILES},
        "VERSION": f"{version}\n".encode(),
        **{f"{PACKAGE}/{p.name}": p.read_bytes() for p in sorted(LOADER.glob("*.py"))},
        f"{PACKAGE}/manifest.json": manifest(
            version.split("+")[0], label, patches, inputs.pristine, inputs.patched
        ),
        **{f"{PACKAGE}/files/{path}": data for path, data in inputs.patched.items()},
    }
    with lifetime.scratch_dir("vllm-moe-overlay-plugin-") as tmp:
        source, wheels = tmp / "plugin", tmp / "wheels"
        for name, data in staged.items():
            path = source / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o644)  # setuptools copies the file's mode into the wheel
        result = subprocess.run(
            [sys.executable, "-c", BUILD_WHEEL, str(wheels)],
            cwd=source,
            capture_output=True,
            text=True,
            env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH},
            umask=0o022,  # the mode of the dist-info files setuptools writes
            preexec_fn=lifetime.die_with_parent(),
        )
        if result.returncode != 0:
            said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise OverlayError(f"setuptools could not build the plugin wheel: {said}")
        (built,) = wheels.glob("*.whl")
        if built.name != out.name:
            raise OverlayError(f"setuptools named the plugin wheel {built.name}, not {out.name}")
        requires_python = _requires_python(built, built.name)
        if requires_python != inputs.requires_python:
            raise OverlayError(
                f"{PROJECT / 'pyproject.toml'} gives Requires-Python {requires_python}, "
                f"{inputs.first} says {inputs.requires_python}: make them agree"
            )
        shutil.copyfile(built, out)
