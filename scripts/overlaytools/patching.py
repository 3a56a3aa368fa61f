"""Apply the patch series to pristine files with `git apply` and compare with the overlay."""

from __future__ import annotations

import difflib
import itertools
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
# A file's `diff --git` line and extended header (mode, index, new/deleted file, rename).
_FILE_HEADER = re.compile(r"^diff --git a/(\S+) b/(\S+)\n(?:[a-z].*\n)*", re.M)
_FAILED_AT = re.compile(r"patch failed: (\S+):(\d+)")
_ORIGIN = re.compile(r"^Origin: *(\S.*)$", re.M)


def series(patches_dir: Path = PATCHES) -> list[Path]:
    """The patches in the order `patches/series` lists them."""
    listing = patches_dir / "series"
    try:
        text = listing.read_text()
    except OSError as exc:
        raise OverlayError(f"cannot read {listing}: {exc.strerror}") from None
    names = series_names(text, listing)
    missing = [n for n in names if not (patches_dir / n).is_file()]
    if missing:
        raise OverlayError(f"{listing} names missing patch(es): {', '.join(missing)}")
    return [patches_dir / n for n in names]


def series_names(text: str, listing: Path | str = "series") -> list[str]:
    """The patch names of a series in quilt's format: one per line, `#` starts a
    comment (a whole line, or after the name and options), blank lines are ignored.
    The only option is -p1, how every patch is applied."""
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        name, options = words[0], list(itertools.takewhile(lambda w: not w.startswith("#"), words[1:]))
        where = f"{listing} line {number}"
        if "/" in name or ".." in name:
            raise OverlayError(f"{where}: {name!r} leaves patches/: name a patch file there, "
                               "without a folder")  # fmt: skip
        unsupported = [o for o in options if o != "-p1"]
        if unsupported:
            raise OverlayError(f"{where}: option {unsupported[0]!r} is not supported: every "
                               "patch applies with -p1")  # fmt: skip
        if name in names:
            raise OverlayError(f"{where}: {name} is listed twice")
        names.append(name)
    return names


def series_header(text: str) -> str:
    """The comment and blank lines before a series' first patch name."""
    lines = text.splitlines(keepends=True)
    kept = 0
    while kept < len(lines) and (not lines[kept].strip() or lines[kept].lstrip().startswith("#")):
        kept += 1
    return "".join(lines[:kept])


def touched_files(patches: list[Path]) -> list[str]:
    """Repository-relative paths the patches change or add, in first-seen order."""
    paths: dict[str, None] = {}
    for patch in patches:
        paths.update(dict.fromkeys(_file_headers(patch)))
    return list(paths)


def added_files(patches: list[Path]) -> list[str]:
    """The touched files that a patch creates: the release has no such file."""
    return [rel for patch in patches for rel, header in _file_headers(patch).items()
            if "\nnew file mode " in header]  # fmt: skip


def _file_headers(patch: Path) -> dict[str, str]:
    """Each file of a patch -> its `diff --git` line and extended header; refuses a
    patch that deletes, renames or copies a file."""
    headers = {}
    for found in _FILE_HEADER.finditer(patch.read_text()):
        old, new, header = found.group(1), found.group(2), found.group(0)
        what = ("deletes" if "\ndeleted file mode " in header else "copies" if "\ncopy from "
                in header else "renames" if old != new else "")  # fmt: skip
        if what:
            raise OverlayError(f"{patch.name} {what} {old}: patches may change or add files, "
                               "not delete, rename or copy them")  # fmt: skip
        headers[new] = header
    return headers


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
    """Pristine files + patches, applied in order by `git apply` (no fuzz, exact context),
    and the files the patches add."""
    with _file_tree(pristine) as (root, env):
        for patch in patches:
            result = _git_apply(root, env, patch)
            if result.returncode != 0:
                raise OverlayError(_describe_failure(patch, result.stderr))
        return {rel: (root / rel).read_bytes() for rel in [*pristine, *added_files(patches)]}


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
