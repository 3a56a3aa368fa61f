"""Write generated patches/ and overlay/ files into the checkout, one atomic
replace per file, logging what changed."""

from __future__ import annotations

import os
from pathlib import Path

from . import patching
from .errors import OverlayError
from .fetch import log


def replace(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically; False if it already held exactly that."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def patches(old: list[str], fresh: dict[str, bytes]) -> int:
    """Write `fresh` (name -> bytes, in order) and its series; remove the `old`
    patches that are no longer part of it. The number of files changed."""
    changed = 0
    for name, data in fresh.items():
        written = replace(patching.PATCHES / name, data)
        changed += written
        log(f"{'unchanged' if not written else 'updated' if name in old else 'added'} patches/{name}")
    changed += _series(patching.PATCHES / "series", list(fresh))
    for name in old:
        if name not in fresh and (patching.PATCHES / name).exists():
            (patching.PATCHES / name).unlink()
            changed += 1
            log(f"removed patches/{name}")
    return changed


def overlays(patched: dict[str, bytes]) -> int:
    """Write each patched file into overlay/ and remove every other file there.
    The number of files changed."""
    changed = 0
    for rel, data in patched.items():
        existed = (patching.OVERLAY / rel).exists()
        written = replace(patching.OVERLAY / rel, data)
        changed += written
        log(f"{'unchanged' if not written else 'updated' if existed else 'added'} overlay/{rel}")
    for rel in patching.overlay_files():
        if rel not in patched:
            (patching.OVERLAY / rel).unlink()
            changed += 1
            log(f"removed overlay/{rel}")
    for folder in sorted(patching.OVERLAY.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return changed


def _series(listing: Path, names: list[str]) -> bool:
    """Leave the series alone when it lists `names` already (comments and all);
    otherwise write its header comments, then one name per line."""
    text = listing.read_text() if listing.is_file() else ""
    try:
        if patching.series_names(text, listing) == names:
            return False
    except OverlayError:
        pass  # a broken series is replaced
    header = patching.series_header(text)
    if any(
        len(line.split()) > 1 or line.lstrip().startswith("#") for line in text[len(header) :].splitlines()
    ):
        log(f"{listing.name}: comments and options after the first patch name were not kept")
    return replace(listing, (header + "".join(f"{n}\n" for n in names)).encode())
