"""The tools run on the Python versions the README claims (3.9 to 3.13), and the wheels do
not depend on which: under the lowest and the highest claimed Python, build.sh makes its own
build environment (build-requirements.txt) and writes the very bytes the default Python's
build wrote into dist/ — the patched wheel (rewheel.py copies zip records through CPython's
private zipfile internals) and the plugin wheel (setuptools, pinned) — so their SHA256SUMS
lines agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from build_helpers import DIST, LOCK, built_wheel, interpreter, run_build

SUPPORTED = ("3.9", "3.13")  # the lowest and the highest claimed (README, build.sh)
ARTIFACT = LOCK.wheels(LOCK.pin, ["cpu"], ["x86_64"])[0]


def sums(out: Path) -> dict[str, str]:
    return {
        name: digest
        for digest, name in (ln.split("  ") for ln in (out / "SHA256SUMS").read_text().splitlines())
    }


@pytest.mark.parametrize("version", SUPPORTED)
def test_build_is_byte_identical_under_each_supported_python(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (python{version} on PATH or a pyenv install)")
    out = tmp_path / "out"
    # Not --offline: the first run makes this Python's build environment (pip, from the
    # package index); the upstream wheels come from the cache.
    for flavour in ("cpu", "plugin"):
        result = run_build(
            "--flavour", flavour, "--arch", "x86_64", "--out-dir", str(out), env={"PYTHON": python}
        )
        assert result.returncode == 0, result.stderr
    names = [built_wheel(ARTIFACT).name, f"vllm_moe_overlay-{LOCK.pin}+{LOCK.label}-py3-none-any.whl"]
    assert sorted(sums(out)) == sorted(names)
    assert sums(out) == {name: sums(DIST)[name] for name in names}
    for name in names:
        assert (out / name).read_bytes() == (DIST / name).read_bytes()
