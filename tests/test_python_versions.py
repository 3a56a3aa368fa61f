"""The tools run on the Python versions the README claims (3.9 to 3.13): rewheel.py
copies zip records through CPython's private zipfile internals, so a build under the
lowest and the highest claimed Python must give the very bytes of the default one's."""

from __future__ import annotations

import shutil
from pathlib import Path

import packaging
import pytest
from build_helpers import LOCK, built_wheel, interpreter, run_build

SUPPORTED = ("3.9", "3.13")  # the lowest and the highest claimed (README, build.sh)
ARTIFACT = LOCK.wheels(LOCK.pin, ["cpu"], ["x86_64"])[0]


@pytest.mark.parametrize("version", SUPPORTED)
def test_build_is_byte_identical_under_each_supported_python(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (python{version} on PATH or a pyenv install)")
    # build.sh needs `packaging`; the pure-Python copy this Python runs serves them all.
    site = tmp_path / "site"
    shutil.copytree(Path(packaging.__file__).parent, site / "packaging")
    out = tmp_path / "out"
    result = run_build(
        "--offline",
        "--flavour",
        "cpu",
        "--arch",
        "x86_64",
        "--out-dir",
        str(out),
        env={"PYTHON": python, "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    built = out / built_wheel(ARTIFACT).name
    assert built.read_bytes() == built_wheel(ARTIFACT).read_bytes()
