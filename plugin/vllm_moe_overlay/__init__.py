"""The MoE overlay as a vLLM plugin: every patch of the series, served over a pristine vLLM.

Two ways in, one decision. The startup hook (_vllm_moe_overlay, run by
vllm_moe_overlay.pth in every interpreter of the environment) calls startup() on the
first lookup of a vLLM module, before any of them is imported; vLLM's general-plugin
entry point register() then logs what was decided, in every process vLLM starts.
Where the hook did not run (the plugin is not in a site directory, `python -S`),
register() decides itself, later: it can no longer serve a module vLLM imported before
its plugins (`vllm serve` imports the fused-MoE layers first) and then refuses.

The decision covers all served files together: if every installed one is
byte-identical to the pinned release's (or, for a module the patches add, absent),
the modules are served under their own names from the files packaged here (pristine
+ the whole series); if all are as this project's patched wheels have them, the
plugin is inert; otherwise it changes nothing and warns.

Standard library only: the plugin imports neither torch nor vLLM.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
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


def allowed() -> bool:
    """Whether vLLM would load this plugin: its own reading of VLLM_PLUGINS (vllm/envs.py,
    vllm/plugins/__init__.py): unset loads every plugin, a comma list only those named."""
    listed = os.environ.get("VLLM_PLUGINS")
    return listed is None or NAME in listed.split(",")


@dataclass(frozen=True)
class Target:
    module: str
    path: str  # relative to the directory holding the vllm package, e.g. vllm/model_executor/...
    pristine_sha256: str | None  # None: the release has no such file (the patches add it)
    patched_sha256: str  # as the patched wheels and the plugin's copy have it
    installed: Path | None  # where the installed vLLM has (or would have) the file
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
    """What the plugin does in this process, and the log records that say why."""

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
            m["patched_sha256"],
            root / m["path"] if root else None,
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
            [(logging.INFO, f"{tag}: inert: the installed vLLM already carries its patches ({names})")],
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
                        "in this process (its startup hook, vllm_moe_overlay.pth, did not run first: "
                        "Python runs a .pth only from a site directory)"
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
                f"{tag}: applied to vLLM {info['vllm_version']}: {subjects} (serving {names} from {FILES})",
            )
        ],
    )


class ServedLoader(importlib.machinery.SourceFileLoader):
    """Runs the packaged file. The module's __file__ names the installed file it stands
    for, as in the patched wheels, so code that finds data beside its own file finds
    vLLM's (fused_moe.py reads its tuned kernel configs from configs/ there)."""

    def __init__(self, fullname: str, path: str, file: str) -> None:
        super().__init__(fullname, path)
        self.file = file

    def exec_module(self, module) -> None:
        module.__file__ = self.file
        super().exec_module(module)


class OverlayFinder:
    """A sys.meta_path finder: serves the target modules, under their own names, from
    the packaged files."""

    def __init__(self, targets: list[Target]) -> None:
        self.files = {
            t.module: (t.packaged, t.installed if t.pristine_sha256 else t.packaged) for t in targets
        }

    def find_spec(self, fullname, path=None, target=None):
        found = self.files.get(fullname)
        if found is None:
            return None
        packaged, file = found
        logger.debug("serving %s from %s [pid %d]", fullname, packaged, os.getpid())
        loader = ServedLoader(fullname, str(packaged), str(file))
        return importlib.util.spec_from_file_location(fullname, packaged, loader=loader)


def _apply(decided: Plan) -> OverlayFinder:
    """The finder of an 'apply' plan, once the packaged files are checked."""
    damaged = [t.packaged for t in decided.targets if _sha256(t.packaged) != t.patched_sha256]
    if damaged:
        raise ManifestError(f"the plugin's file {damaged[0]} is missing or not the one its manifest records")
    return OverlayFinder(decided.targets)


# What the plugin decided in this process (a forked child inherits it): by the startup
# hook, or by register() where the hook did not run; None until then.
decision: Plan | None = None


def startup() -> OverlayFinder | None:
    """Called once per process by the startup hook, on the first lookup of a vLLM module
    (the hook's finder answers nothing meanwhile): the finder to consult for every vLLM
    module from then on, or None. Raises on a fault; the hook reports it."""
    global decision
    if not allowed():
        return None
    decided = plan()
    finder = _apply(decided) if decided.action == "apply" else None
    decision = decided
    return finder


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
    global decision
    decided = decision or plan()
    if decision is None:  # neither did the startup hook (plan() looks vllm up): decide now
        if decided.action == "apply":
            sys.meta_path.insert(0, _apply(decided))  # last: nothing before it changes the process
        decision = decided
    for level, message in decision.records:
        if decision.action == "apply":
            message = f"{message} [pid {os.getpid()}]"  # once per process, forked ones too
        logger.log(level, message)
