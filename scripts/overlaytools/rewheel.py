"""Write a patched copy of an upstream wheel without recompressing what did not change.

`wheel unpack` + `wheel pack` inflates and deflates all 1.17 GB of the CUDA
wheel (59 s here) and renames the platform tag after the WHEEL file. Here the
unchanged members' local records (header and compressed data) are copied as
raw byte ranges; only the changed and added files and the renamed
dist-info are written anew, and RECORD reuses upstream's rows for unchanged
members.
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path
from typing import BinaryIO

from .errors import OverlayError
from .lock import Artifact, Lock

COPY_CHUNK = 8 << 20


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def wheel_filename(upstream_filename: str, name: str, version: str) -> str:
    """Upstream's tags, unchanged, behind the new name and version."""
    tags = upstream_filename[: -len(".whl")].split("-")[-3:]
    return "-".join([name, version.replace("-", "_"), *tags]) + ".whl"


def patched_filename(locked: Lock, artifact: Artifact, version: str) -> str:
    """The file name of the patched wheel built from `artifact`, a wheel of `version`."""
    return wheel_filename(artifact.filename, "vllm", locked.patched_version(version, artifact.flavour))


def dist_info_dir(zf: zipfile.ZipFile) -> str:
    tops = {n.split("/", 1)[0] for n in zf.namelist() if n.count("/") == 1}
    found = [t for t in tops if t.endswith(".dist-info") and f"{t}/METADATA" in zf.NameToInfo]
    if len(found) != 1:
        raise OverlayError(f"expected one .dist-info directory with METADATA, found {found}")
    return found[0]


def set_metadata(metadata: bytes, name: str, version: str) -> bytes:
    header, sep, body = metadata.decode("utf-8").partition("\n\n")
    for field, value in (("Name", name), ("Version", version)):
        header, count = re.subn(rf"^{field}: .*$", f"{field}: {value}", header, count=1, flags=re.M)
        if count != 1:
            raise OverlayError(f"METADATA has no {field} field")
    return (header + sep + body).encode("utf-8")


def set_version_module(source: bytes, upstream: str, version: str) -> bytes:
    """vllm/_version.py (setuptools-scm output) with the patched version."""
    release, _, local = version.partition("+")
    release_tuple = ", ".join(release.split("."))
    text = source.decode("utf-8")
    for pattern, value in (
        (r"__version__ = version = '([^']*)'", f"__version__ = version = '{version}'"),
        (
            r"__version_tuple__ = version_tuple = \(([^)]*)\)",
            f"__version_tuple__ = version_tuple = ({release_tuple}, '{local}')",
        ),
    ):
        match = re.search(pattern, text)
        if not match:
            raise OverlayError(f"vllm/_version.py has no line matching {pattern!r}")
        text = text[: match.start()] + value + text[match.end() :]
    if f"'{upstream}'" not in source.decode("utf-8"):
        raise OverlayError(f"vllm/_version.py does not say {upstream}")
    return text.encode("utf-8")


def _upstream_record(zf: zipfile.ZipFile, distinfo: str) -> dict[str, tuple[str, str]]:
    rows = csv.reader(io.StringIO(zf.read(f"{distinfo}/RECORD").decode("utf-8")))
    return {row[0]: (row[1], row[2]) for row in rows if row}


def rewrite(
    source: BinaryIO,
    out_path: Path,
    name: str,
    version: str,
    upstream_version: str,
    files: dict[str, bytes],
) -> None:
    """Write `source` (an upstream wheel) to `out_path` as `name` `version`.

    `files` maps member names to their new content; a name the wheel lacks is
    added, just before the dist-info, with vllm/_version.py's timestamp and
    mode. Besides those, only vllm/_version.py and the dist-info (renamed;
    METADATA and RECORD rewritten) change; every other member keeps its bytes.
    """
    zin = zipfile.ZipFile(source)
    old_di = dist_info_dir(zin)
    new_di = f"{name}-{version}.dist-info"
    template = zin.getinfo("vllm/_version.py")
    added = {}
    for member in sorted(m for m in files if m not in zin.NameToInfo):
        added[member] = zipfile.ZipInfo(member, date_time=template.date_time)
        added[member].external_attr = template.external_attr
        added[member].create_system = template.create_system

    content = {m: data for m, data in files.items() if m not in added}
    content["vllm/_version.py"] = set_version_module(zin.read("vllm/_version.py"), upstream_version, version)
    content[f"{old_di}/METADATA"] = set_metadata(zin.read(f"{old_di}/METADATA"), name, version)
    for member in zin.namelist():
        if member.startswith(f"{old_di}/") and member not in content:
            content[member] = zin.read(member)  # renamed, so its header is written anew

    record_name = f"{new_di}/RECORD"
    upstream_rows = _upstream_record(zin, old_di)
    rows = []
    for info in zin.infolist():
        new_name = _renamed(info.filename, old_di, new_di)
        if new_name == record_name:
            continue
        if info.filename in content:
            data = content[info.filename]
            rows.append([new_name, record_hash(data), str(len(data))])
        elif info.filename in upstream_rows:
            rows.append([new_name, *upstream_rows[info.filename]])
        else:
            raise OverlayError(f"upstream RECORD has no row for {info.filename}")
    rows += [[member, record_hash(files[member]), str(len(files[member]))] for member in added]
    rows.append([record_name, "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    content[f"{old_di}/RECORD"] = record.getvalue().encode("utf-8")

    with open(out_path, "wb") as out, zipfile.ZipFile(out, "w") as zout:
        _write_members(
            zin,
            source,
            zout,
            content,
            old_di,
            new_di,
            {info: files[member] for member, info in added.items()},
        )


def _renamed(member: str, old_di: str, new_di: str) -> str:
    return new_di + member[len(old_di) :] if member.startswith(f"{old_di}/") else member


def _write_members(zin, source, zout, content, old_di, new_di, added) -> None:
    infos = sorted(zin.infolist(), key=lambda i: i.header_offset)
    ends = [i.header_offset for i in infos[1:]] + [zin.start_dir]
    run: list[tuple[zipfile.ZipInfo, int]] = []  # unchanged members awaiting a raw copy
    for info, end in zip(infos, ends):
        if info.filename not in content:
            run.append((info, end))
            continue
        _copy_raw(run, source, zout)
        run = []
        if info.filename.startswith(f"{old_di}/"):
            for extra, data in added.items():  # the added files go just before the dist-info
                _write(zout, extra, data)
            added = {}
        new = zipfile.ZipInfo(_renamed(info.filename, old_di, new_di), date_time=info.date_time)
        new.external_attr = info.external_attr
        new.create_system = info.create_system
        _write(zout, new, content[info.filename])
    _copy_raw(run, source, zout)


def _write(zout: zipfile.ZipFile, info: zipfile.ZipInfo, data: bytes) -> None:
    info.compress_type = zipfile.ZIP_DEFLATED
    zout.writestr(info, data)


def _copy_raw(run, source: BinaryIO, zout: zipfile.ZipFile) -> None:
    """Copy consecutive local records verbatim and register them for the central directory."""
    if not run:
        return
    start, end = run[0][0].header_offset, run[-1][1]
    shift = zout.start_dir - start
    zout.fp.seek(zout.start_dir)
    source.seek(start)
    remaining = end - start
    while remaining:
        chunk = source.read(min(COPY_CHUNK, remaining))
        if not chunk:
            raise OverlayError("the wheel ends inside a member's data")
        zout.fp.write(chunk)
        remaining -= len(chunk)
    for info, _ in run:
        moved = copy.copy(info)
        moved.header_offset += shift
        zout.filelist.append(moved)
        zout.NameToInfo[moved.filename] = moved
    zout.start_dir = zout.fp.tell()
    zout._didModify = True
