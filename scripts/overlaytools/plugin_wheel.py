"""The pure-Python plugin wheel: the loader of plugin/, the overlay files verbatim, a manifest.

Written with zipfile and the RECORD rows of rewheel: sorted members, one
fixed timestamp and mode, so the same inputs give the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path, PurePosixPath

from . import gitrepo, rewheel
from .errors import OverlayError
from .lock import REPO

DIST_NAME = "vllm-moe-overlay"
PACKAGE = "vllm_moe_overlay"
LOADER = REPO / "plugin" / PACKAGE
ENTRY_POINT = f"[vllm.general_plugins]\n{PACKAGE} = {PACKAGE}:register\n"
DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say
FILE_MODE = 0o100644 << 16
SUMMARY = "vLLM {version} MoE fixes ({label}) loaded as a vLLM general plugin"


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


def manifest(version: str, label: str, patches: list[Path], pristine: dict[str, bytes],
             patched: dict[str, bytes]) -> bytes:  # fmt: skip
    info = {
        "vllm_version": version,
        "label": label,
        "patches": [
            {"name": p.name, "subject": gitrepo.read_message(p).text.partition("\n")[0]}
            for p in patches
        ],
        "modules": [
            {"module": module_name(path), "path": path,
             # None: a module the patches add, which the release does not have
             "pristine_sha256": hashlib.sha256(pristine[path]).hexdigest() if path in pristine else None,
             "patched_sha256": hashlib.sha256(patched[path]).hexdigest()}
            for path in sorted(patched)
        ],  # fmt: skip
    }
    return (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()


def write(out: Path, version: str, label: str, patches: list[Path], inputs: Inputs) -> None:
    """The plugin wheel `version` (release+label), at `out`."""
    package = {
        f"{PACKAGE}/{p.relative_to(LOADER)}": p.read_bytes()
        for p in sorted(LOADER.rglob("*.py"))
    }
    package[f"{PACKAGE}/manifest.json"] = manifest(
        version.split("+")[0], label, patches, inputs.pristine, inputs.patched
    )
    for path, data in inputs.patched.items():
        package[f"{PACKAGE}/files/{path}"] = data
    dist_info = f"{PACKAGE}-{version}.dist-info"
    meta = {
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {version}\n"
            f"Summary: {SUMMARY.format(version=version.split('+')[0], label=label)}\n"
            f"Requires-Python: {inputs.requires_python}\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: vllm-moe-overlay build.sh\n"
            "Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": ENTRY_POINT,
    }
    members = {**dict(sorted(package.items())), **{k: v.encode() for k, v in meta.items()}}
    record = f"{dist_info}/RECORD"
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerows([name, rewheel.record_hash(data), len(data)] for name, data in members.items())
    writer.writerow([record, "", ""])
    members[record] = rows.getvalue().encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=DATE_TIME)
            info.external_attr = FILE_MODE
            info.create_system = 3  # Unix, so installers honour the mode
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
