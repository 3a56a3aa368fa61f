"""The MoE overlay as a vLLM general plugin (entry point `vllm_moe_overlay`).

vLLM calls register() in every process it starts, before any model code is
imported. The plugin carries only the patches whose every file is a model file
(vLLM imports those after the plugins); the manifest lists the others as not
carried, with the reason. If every file it serves is byte-identical in the
installed vLLM to the pinned release's pristine file (or, for a module the
patches add, absent), register() puts an import hook on sys.meta_path that
serves those modules from the files packaged here (pristine + the carried
patches). Otherwise it changes nothing and logs why.

Standard library only: loading the plugin imports neither torch nor vLLM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import schema

NAME = "vllm_moe_overlay"  # the entry point's name: what VLLM_PLUGINS lists
# Not resolved: the served modules are named by the path Python found the package at, as
# every other module is (a cache or venv reached through a symlink stays as given).
FILES = Path(__file__).parent / "files"
# A child of vLLM's logger, so vLLM's handler formats these lines in its processes.
logger = logging.getLogger(f"vllm.{NAME}")


class ManifestError(ValueError):
    """The packaged manifest cannot be trusted: the plugin must not act on it."""


def manifest() -> dict:
    """Written at build time: target release, label, patches, per-file sha256; validated
    against the schema this loader reads (schema.py)."""
    path = Path(__file__).parent / "manifest.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    problem = schema.problem(info)
    if problem:
        raise ManifestError(f"{path}: {problem}")
    return info


@dataclass(frozen=True)
class Target:
    module: str
    path: str  # relative to the directory holding the vllm package, e.g. vllm/model_executor/...
    pristine_sha256: str | None  # None: the release has no such file (the patches add it)
    served_sha256: str  # the packaged file's: pristine + the carried patches
    patched_sha256: str  # as the patched wheels have it: pristine + the whole series
    found_sha256: str | None  # the installed file's, or None: there is none

    @property
    def state(self) -> str:
        """pristine, patched (already carries the fix) or other."""
        return {self.pristine_sha256: "pristine", self.patched_sha256: "patched"}.get(
            self.found_sha256, "other"
        )

    @property
    def packaged(self) -> Path:
        return FILES / self.path


@dataclass(frozen=True)
class Plan:
    """What register() does in this process, and the log records that say why."""

    action: str  # apply, patched, mismatch or imported
    targets: list[Target]
    records: list[tuple[int, str]]


def installed_root() -> Path | None:
    """The directory holding the installed vllm package, found without importing it."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except IsADirectoryError:
        return "a directory"
    except OSError:
        return None


def describe(sha256: str | None) -> str:
    return f"sha256 {sha256}" if sha256 else "no file"


def plan() -> Plan:
    """Inspect the installed vLLM; decide all or nothing. Has no side effects."""
    info = manifest()
    root = installed_root()
    targets = [
        Target(
            m["module"],
            m["path"],
            m["pristine_sha256"],
            m["served_sha256"],
            m["patched_sha256"],
            _sha256(root / m["path"]) if root else None,
        )
        for m in info["modules"]
    ]
    tag = f"vllm-moe-overlay {info['label']}"
    names = ", ".join(t.module for t in targets)
    if all(t.state == "patched" for t in targets):
        return Plan(
            "patched",
            targets,
            [(logging.INFO, (f"{tag}: inert: the installed vLLM already carries its patches ({names})"))],
        )
    others = [t for t in targets if t.state != "pristine"]
    if others:
        return Plan(
            "mismatch",
            targets,
            [
                (
                    logging.WARNING,
                    (
                        f"{tag}: not applied, nothing changed: {t.module} is not vLLM "
                        f"{info['vllm_version']}'s file (expected {describe(t.pristine_sha256)}, "
                        f"found {describe(t.found_sha256)})"
                    ),
                )
                for t in others
            ],
        )
    imported = [t.module for t in targets if t.module in sys.modules]
    if imported:
        return Plan(
            "imported",
            targets,
            [
                (
                    logging.ERROR,
                    (
                        f"{tag}: refused, nothing applied: {', '.join(imported)} was imported before "
                        "the plugin ran; serving the patched file now would leave two versions of it "
                        "in this process"
                    ),
                )
            ],
        )
    subjects = "; ".join(p["subject"] for p in info["carried"])
    return Plan(
        "apply",
        targets,
        [
            (
                logging.INFO,
                (
                    f"{tag}: applied to vLLM {info['vllm_version']}: {subjects} "
                    f"(serving {names} from {FILES}){not_carried(info)}"
                ),
            )
        ],
    )


def not_carried(info: dict) -> str:
    """'; not carried: <subject> (<reason>)' per patch the plugin lacks, or ''."""
    return "".join(f"; not carried: {p['subject']} ({p['reason']})" for p in info["not_carried"])


class OverlayFinder:
    """A sys.meta_path finder: serves the target modules, under their own names, from
    the packaged files."""

    def __init__(self, targets: list[Target], announcement: str) -> None:
        self.files = {t.module: t.packaged for t in targets}
        self.announcement = announcement
        self.announced_in: int | None = None

    def announce(self) -> None:
        """The INFO line, once per process (a forked child inherits the finder)."""
        if self.announced_in != os.getpid():
            self.announced_in = os.getpid()
            logger.info("%s [pid %d]", self.announcement, self.announced_in)

    def find_spec(self, fullname, path=None, target=None):
        file = self.files.get(fullname)
        if file is None:
            return None
        self.announce()
        logger.debug("serving %s from %s [pid %d]", fullname, file, os.getpid())
        return importlib.util.spec_from_file_location(fullname, file)


def active_finder() -> OverlayFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, OverlayFinder)), None)


_registered_in: int | None = None


def register() -> None:
    """vLLM's entry point. Cheap, and safe to call again in the same or a forked process.

    Never raises: vLLM does not catch a plugin's exception, so any failure here
    is one ERROR line, and nothing is applied."""
    global _registered_in
    if _registered_in == os.getpid():
        return
    _registered_in = os.getpid()
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - the plugin must never take vLLM down
        cause = str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__}: {exc}"
        logger.error("vllm-moe-overlay: not applied, nothing changed: %s", cause)


def _register() -> None:
    finder = active_finder()
    if finder is not None:
        finder.announce()
        return
    decided = plan()
    if decided.action == "apply":
        damaged = [t.packaged for t in decided.targets if _sha256(t.packaged) != t.served_sha256]
        if damaged:
            raise ManifestError(
                f"the plugin's file {damaged[0]} is missing or not the one its manifest records"
            )
        ((_, announcement),) = decided.records
        finder = OverlayFinder(decided.targets, announcement)
        finder.announce()
        sys.meta_path.insert(0, finder)  # last: nothing before it changes the process
        return
    for level, message in decided.records:
        logger.log(level, message)
