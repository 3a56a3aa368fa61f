"""The wheels build.sh wrote into dist/: content against upstream, RECORD, reproducibility."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from build_helpers import (
    DIST,
    LOCK,
    REPO,
    assert_record_complete,
    built_wheel,
    dist_info,
    raw_member,
    run_build,
    upstream_path,
)
from packaging.utils import parse_wheel_filename
from packaging.version import Version
from series_helpers import ADDED, CHANGED, FILES

WHEELS = LOCK.wheels(LOCK.pin, ["cuda", "cpu"], ["x86_64", "aarch64"])
ids = [f"{a.flavour}-{a.arch}" for a in WHEELS]


@pytest.mark.parametrize("artifact", WHEELS, ids=ids)
def test_only_the_fix_version_and_dist_info_differ(artifact):
    up_path, out_path = upstream_path(artifact), built_wheel(artifact)
    up, out = zipfile.ZipFile(up_path), zipfile.ZipFile(out_path)
    old_di, new_di = dist_info(up), dist_info(out)
    version = LOCK.patched_version(LOCK.pin, artifact.flavour)
    assert new_di == f"vllm-{version}.dist-info"

    renamed = [n.replace(old_di, new_di, 1) for n in up.namelist()]
    assert [n for n in out.namelist() if n not in ADDED] == renamed  # upstream's, in its order
    assert set(out.namelist()) - set(renamed) == set(ADDED)
    first_di = min(out.namelist().index(n) for n in out.namelist() if n.startswith(new_di))
    assert all(out.namelist().index(n) < first_di for n in ADDED)  # dist-info stays last

    changed = set()
    for up_info in up.infolist():
        out_info = out.getinfo(up_info.filename.replace(old_di, new_di, 1))
        if up_info.filename.startswith(old_di):
            if up.read(up_info) != out.read(out_info):
                changed.add(up_info.filename[len(old_di) + 1 :])
        elif raw_member(up_path, up_info) != raw_member(out_path, out_info):
            changed.add(up_info.filename)
    assert changed == {*CHANGED, "vllm/_version.py", "METADATA", "RECORD"}

    for member in FILES:
        assert out.read(member) == (REPO / "overlay" / member).read_bytes()
    # Rewritten members keep upstream's timestamps and modes; added ones take vllm/_version.py's.
    for info in out.infolist():
        up_info = up.getinfo(
            "vllm/_version.py" if info.filename in ADDED else info.filename.replace(new_di, old_di, 1)
        )
        assert (info.date_time, info.external_attr) == (up_info.date_time, up_info.external_attr)


@pytest.mark.parametrize("artifact", WHEELS, ids=ids)
def test_names_and_versions(artifact):
    out_path = built_wheel(artifact)
    version = LOCK.patched_version(LOCK.pin, artifact.flavour)
    name, parsed_version, _, tags = parse_wheel_filename(out_path.name)
    assert (name, str(parsed_version)) == ("vllm", version)
    assert tags == parse_wheel_filename(artifact.filename)[3]  # upstream's tags unchanged
    assert Version(version).public == LOCK.pin
    assert ("cpu" in version) == (artifact.flavour == "cpu")  # what selects vLLM's CpuPlatform

    zf = zipfile.ZipFile(out_path)
    metadata = zf.read(f"{dist_info(zf)}/METADATA").decode().partition("\n\n")[0]
    assert re.findall(r"^(Name|Version): (.*)$", metadata, re.M) == [
        ("Name", "vllm"),
        ("Version", version),
    ]
    namespace: dict = {}
    exec(zf.read("vllm/_version.py"), namespace)
    assert namespace["__version__"] == version


@pytest.mark.parametrize("artifact", WHEELS, ids=ids)
def test_record_lists_every_member_with_its_hash(artifact):
    assert_record_complete(zipfile.ZipFile(built_wheel(artifact)))


def test_sha256sums_lists_every_wheel():
    listed = {}
    for line in (DIST / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert set(listed) == {p.name for p in DIST.glob("*.whl")}
    for artifact in WHEELS:
        path = built_wheel(artifact)
        assert listed[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_build_is_byte_identical(tmp_path):
    result = run_build("--offline", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "SHA256SUMS").read_bytes() == (DIST / "SHA256SUMS").read_bytes()
    for artifact in WHEELS:
        wheel = built_wheel(artifact)
        assert (tmp_path / wheel.name).read_bytes() == wheel.read_bytes()


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_pip_installs_the_wheel(tmp_path, flavour):
    (artifact,) = LOCK.wheels(LOCK.pin, [flavour], ["x86_64"])
    wheel = built_wheel(artifact)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--target",
            str(tmp_path),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    version = LOCK.patched_version(LOCK.pin, flavour)
    installed = Path(tmp_path, f"vllm-{version}.dist-info")
    assert (installed / "INSTALLER").read_text().strip() == "pip"
    for member in FILES:
        assert (tmp_path / member).read_bytes() == (REPO / "overlay" / member).read_bytes()
