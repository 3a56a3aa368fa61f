"""Apply the patch series to pristine files with `git apply` and compare with the overlay."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OverlayError
from .lock import REPO

PATCHES = REPO / "patches"
OVERLAY = REPO / "overlay"
_DIFF_HEADER = re.compile(r"^diff --git a/(\S+) b/", re.M)
_FAILED_AT = re.compile(r"patch failed: (\S+):(\d+)")
_ORIGIN = re.compile(r"^Origin: *(\S.*)$", re.M)


def series(patches_dir: Path = PATCHES) -> list[Path]:
    """The patches in the order `patches/series` lists them."""
    listing = patches_dir / "series"
    try:
        names = [n for n in listing.read_text().split() if not n.startswith("#")]
    except OSError as exc:
        raise OverlayError(f"cannot read {listing}: {exc.strerror}") from None
    missing = [n for n in names if not (patches_dir / n).is_file()]
    if missing:
        raise OverlayError(f"{listing} names missing patch(es): {', '.join(missing)}")
    return [patches_dir / n for n in names]


def touched_files(patches: list[Path]) -> list[str]:
    """Repository-relative paths the patches change, in first-seen order."""
    paths: dict[str, None] = {}
    for patch in patches:
        paths.update(dict.fromkeys(_DIFF_HEADER.findall(patch.read_text())))
    return list(paths)


def origin(message: str) -> str | None:
    """The `Origin:` provenance field of a commit message or patch header, if any."""
    found = _ORIGIN.search(message.split("\n---\n", 1)[0])
    return found.group(1) if found else None


def overlay_files(overlay_dir: Path = OVERLAY) -> list[str]:
    """Repository-relative paths of every file under overlay/."""
    if not overlay_dir.is_dir():
        return []
    return sorted(p.relative_to(overlay_dir).as_posix() for p in overlay_dir.rglob("*") if p.is_file())


def refuse_strays(touched: list[str], overlay_dir: Path = OVERLAY) -> None:
    """An overlay file that no patch changes would never reach a wheel: refuse it."""
    strays = [rel for rel in overlay_files(overlay_dir) if rel not in touched]
    if strays:
        raise OverlayError(
            f"{', '.join('overlay/' + rel for rel in strays)}: no patch in patches/series "
            "changes it; add a patch for it with scripts/patch-queue (import, commit, export), "
            "or delete it"
        )


def write_files(root: Path, files: dict[str, bytes]) -> None:
    """Write each repository-relative path of `files` under `root`."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@contextmanager
def _file_tree(files: dict[str, bytes]) -> Iterator[tuple[Path, dict[str, str]]]:
    """`files` written under a temporary root, and an environment for git there."""
    with tempfile.TemporaryDirectory(prefix="overlay-apply-") as tmp:
        root = Path(tmp)
        write_files(root, files)
        # Keep git from treating an enclosing checkout as the tree to patch.
        yield root, {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}


def _git_apply(root: Path, env: dict[str, str], patch: Path, *flags: str):
    return subprocess.run(
        ["git", "apply", "-p1", "--whitespace=nowarn", *flags, str(patch.resolve())],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip


def apply(pristine: dict[str, bytes], patches: list[Path]) -> dict[str, bytes]:
    """Pristine files + patches, applied in order by `git apply` (no fuzz, exact context)."""
    with _file_tree(pristine) as (root, env):
        for patch in patches:
            result = _git_apply(root, env, patch)
            if result.returncode != 0:
                raise OverlayError(_describe_failure(patch, result.stderr))
        return {rel: (root / rel).read_bytes() for rel in pristine}


def check_applies(files: dict[str, bytes], patch: Path, reverse: bool = False) -> str:
    """'' if `git apply --check` accepts the patch (reversed if asked), else why not."""
    with _file_tree(files) as (root, env):
        result = _git_apply(root, env, patch, "--check", *(["--reverse"] if reverse else []))
    return "" if result.returncode == 0 else _describe_failure(patch, result.stderr)


def _describe_failure(patch: Path, stderr: str) -> str:
    failed = _FAILED_AT.search(stderr)
    if not failed:
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else "git apply failed"
        return f"{patch.name} does not apply: {reason}"
    path, line = failed.group(1), failed.group(2)
    return f"{patch.name}: hunk {_hunk_header(patch, path, line)} does not apply to {path}"


def _hunk_header(patch: Path, path: str, old_start: str) -> str:
    current = None
    for text in patch.read_text().splitlines():
        if text.startswith("diff --git "):
            current = _DIFF_HEADER.match(text + "\n").group(1)
        elif current == path and re.match(rf"@@ -{old_start}(,\d+)? ", text):
            return "'" + text + "'"
    return f"at line {old_start}"


def overlay_mismatches(patched: dict[str, bytes], overlay_dir: Path = OVERLAY) -> str:
    """A unified diff of every overlay file that differs from pristine + patches ('' if none)."""
    out = []
    for rel, expected in patched.items():
        overlay_file = overlay_dir / rel
        actual = overlay_file.read_bytes() if overlay_file.exists() else b""
        if actual != expected:
            out.append(text_diff(expected, actual, f"pristine+patches/{rel}", f"overlay/{rel}"))
    return "".join(out)


def text_diff(old: bytes, new: bytes, fromfile: str, tofile: str) -> str:
    """A unified diff of two versions of a text file."""
    return "".join(difflib.unified_diff(
        old.decode().splitlines(keepends=True), new.decode().splitlines(keepends=True),
        fromfile=fromfile, tofile=tofile,
    ))  # fmt: skip


def check(pristine: dict[str, bytes], patches: list[Path], overlay_dir: Path = OVERLAY) -> dict:
    """Apply the series and require the overlay to equal the result, with no other
    file in it; return the result."""
    patched = apply(pristine, patches)
    refuse_strays(list(patched), overlay_dir)
    diff = overlay_mismatches(patched, overlay_dir)
    if diff:
        raise OverlayError(
            "overlay differs from pristine + patches: after editing an overlay run "
            "scripts/refresh-patches; after editing a patch run scripts/refresh-patches --overlays; "
            "after working in the patch queue run scripts/patch-queue export",
            detail=diff,
        )
    return patched
