"""The manifest (manifest.json) that the plugin wheel carries: its fields and their checks.

Shared by the builder, which loads this file on its own (scripts/overlaytools/plugin_wheel.py),
and the loader, which refuses a manifest this module does not accept. Standard library only,
and no import from the package. Change a field's meaning or add one: raise SCHEMA_VERSION.
"""

from __future__ import annotations

import json
import re

SCHEMA_VERSION = 3
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest(vllm_version: str, label: str, carried: list[dict], modules: list[dict]) -> dict:
    """The manifest of this schema version; ValueError if it would not pass problem().

    carried: {"name", "subject"} per patch of the series, in series order (the plugin
    carries them all).
    modules: {"module", "path", "pristine_sha256", "patched_sha256"} per served file: the
    release's file (None for a module the patches add) and the patched wheels' (pristine +
    the whole series), which is also the plugin's own copy."""
    info = {
        "schema": SCHEMA_VERSION,
        "vllm_version": vllm_version,
        "label": label,
        "carried": carried,
        "modules": modules,
    }
    found = problem(info)
    if found:
        raise ValueError(found)
    return info


def dumps(info: dict) -> bytes:
    return (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()


def problem(info) -> str | None:
    """Why `info` is not a manifest of SCHEMA_VERSION, or None."""
    if not isinstance(info, dict):
        return "not a JSON object"
    schema = info.get("schema")
    if schema != SCHEMA_VERSION or isinstance(schema, bool):
        return f"schema {schema!r} is not {SCHEMA_VERSION}, the one this plugin reads"

    def strings(entry, keys):
        return isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k] for k in keys)

    if not strings(info, ("vllm_version", "label")):
        return "vllm_version and label must be non-empty strings"
    if not isinstance(info.get("carried"), list) or not info["carried"]:
        return "carried must be a non-empty list"
    if not all(strings(p, ("name", "subject")) for p in info["carried"]):
        return "each carried patch needs a name and a subject"
    if not isinstance(info.get("modules"), list) or not info["modules"]:
        return "modules must be a non-empty list"
    for m in info["modules"]:
        if not strings(m, ("module", "path", "patched_sha256")) or not (
            "pristine_sha256" in m and (m["pristine_sha256"] is None or isinstance(m["pristine_sha256"], str))
        ):
            return (
                "each module needs module, path and patched_sha256 strings "
                "and a pristine_sha256 string or null"
            )
        parts = m["path"].split("/")
        if (
            parts[0] != "vllm"
            or not m["path"].endswith(".py")
            or ".." in parts
            or m["module"] != m["path"][: -len(".py")].replace("/", ".")
        ):
            return f"module {m['module']!r} does not match its path {m['path']!r}"
        hashes = (m["patched_sha256"], m["pristine_sha256"])
        if not all(_SHA256.fullmatch(h) for h in hashes if h is not None):
            return f"{m['module']}: a sha256 is not 64 lower-case hex digits"
    return None
