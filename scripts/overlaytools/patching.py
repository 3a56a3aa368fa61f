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

from . import lifetime
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
    links = [patches_dir] if patches_dir.is_symlink() else []
    links += sorted(p for p in patches_dir.iterdir() if p.is_symlink()) if patches_dir.is_dir() else []
    if links:
        raise OverlayError(f"{links[0]} is a symlink; patches/ holds plain files only")
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
            raise OverlayError(
                f"{where}: {name!r} leaves patches/: name a patch file there, without a folder"
            )
        unsupported = [o for o in options if o != "-p1"]
        if unsupported:
            raise OverlayError(
                f"{where}: option {unsupported[0]!r} is not supported: every patch applies with -p1"
            )
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
        paths.update(dict.fromkeys(check_format(patch)))
    return list(paths)


_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
# Extended git headers of changes a patch of this overlay may not make.
_REFUSED_HEADERS = {
    "deleted file mode": "deletes",
    "rename from": "renames",
    "copy from": "copies",
    "old mode": "changes the mode of",
    "GIT binary patch": "changes binary",
    "Binary files": "changes binary",
}


# Modes a file a patch adds may have: regular files (a symlink is 120000, a submodule 160000).
_FILE_MODES = ("100644", "100755")


def target_problem(path: str) -> str | None:
    """Why a patch may not change repository-relative `path`, or None."""
    parts = path.split("/")
    if parts[0] != "vllm" or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return f"{path} is not a file under vllm/"
    if path == "vllm/_version.py":
        return "vllm/_version.py is written by the build (the patched version), not by patches"
    return None


def check_format(patch: Path) -> dict[str, str]:
    """Each file of a patch -> its `diff --git` line and extended header. The one reader
    of patch headers: it refuses a patch the build cannot trust to reach the wheels
    exactly: not UTF-8, not in git's format (a 'diff --git' section for each file, a/
    and b/ paths), a path outside vllm/, or a deletion, rename, copy, mode or binary
    change."""
    data = patch.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OverlayError(
            f"{patch.name} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
    headers: dict[str, str] = {}
    current = None  # the file of the 'diff --git' section being read
    in_header = False  # between a 'diff --git' line and the section's first ---/+++/@@
    old = new = 0  # lines left in the current hunk
    for number, line in enumerate(text.split("\n"), 1):
        if old > 0 or new > 0:  # a hunk body; an empty line is blank context
            old -= line[:1] in (" ", "-", "")
            new -= line[:1] in (" ", "+", "")
            continue
        where = f"{patch.name} line {number}"
        if line.startswith("diff --git "):
            found = re.fullmatch(r"diff --git a/(\S+) b/(\S+)", line)
            if not found:
                raise OverlayError(f"{where}: cannot read {line!r}")
            if found.group(1) != found.group(2):
                _refuse(patch, "renames", f"{found.group(1)} to {found.group(2)}")
            current, in_header = found.group(1), True
            problem = target_problem(current)
            if problem:
                raise OverlayError(f"{patch.name}: {problem}")
            headers[current] = line + "\n"
        elif line.startswith(("--- ", "+++ ", "@@ ")) and current is None:
            raise OverlayError(
                f"{where}: {line!r} has no 'diff --git' header; the patch is not "
                "in git's format (write it with git format-patch)"
            )
        elif line.startswith(("--- ", "+++ ")):
            in_header = False
            side = "a/" if line[0] == "-" else "b/"
            if line == "+++ /dev/null":
                _refuse(patch, "deletes", current)
            if line[4:] not in (side + current, "/dev/null"):
                raise OverlayError(f"{where}: {line!r} does not name {side}{current}")
        elif current is not None and (hunk := _HUNK.match(line)):
            in_header = False
            old, new = (int(n) if n is not None else 1 for n in hunk.groups())
        elif current is not None:
            verb = next((v for h, v in _REFUSED_HEADERS.items() if line.startswith(h)), None)
            if line.startswith(("new file mode ", "new mode ")) and line.split()[-1] not in _FILE_MODES:
                verb = f"gives mode {line.split()[-1]} (a symlink or submodule) to"
            if verb:
                _refuse(patch, verb, current)
            if in_header:
                headers[current] += line + "\n"
    if not headers:
        raise OverlayError(f"{patch.name} has no 'diff --git' section: it changes no file")
    return headers


ONLY_CHANGE_OR_ADD = "patches may only change or add files"


def _refuse(patch: Path, verb: str, path: str) -> None:
    raise OverlayError(f"{patch.name} {verb} {path}: {ONLY_CHANGE_OR_ADD}")


def added_files(patches: list[Path]) -> list[str]:
    """The touched files that a patch creates: the release has no such file."""
    return [
        rel
        for patch in patches
        for rel, header in check_format(patch).items()
        if "\nnew file mode " in header
    ]


def origin(message: str) -> str | None:
    """The `Origin:` provenance field of a commit message or patch header, if any."""
    found = _ORIGIN.search(message.split("\n---\n", 1)[0])
    return found.group(1) if found else None


def overlay_files() -> list[str]:
    """Repository-relative paths of every file under overlay/, which must hold no
    symlink (a link would let the tools read or write outside the checkout)."""
    links = [OVERLAY] if OVERLAY.is_symlink() else []
    files = []
    for folder, dirs, names in os.walk(OVERLAY):
        links += [Path(folder, n) for n in dirs + names if Path(folder, n).is_symlink()]
        files += [Path(folder, n).relative_to(OVERLAY).as_posix() for n in names]
    if links:
        raise OverlayError(f"{links[0]} is a symlink; overlay/ holds plain files and directories only")
    return sorted(files)


def refuse_strays(touched: list[str]) -> None:
    """An overlay file that no patch changes would never reach a wheel: refuse it."""
    strays = [rel for rel in overlay_files() if rel not in touched]
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
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lifetime.die_with_parent(),
    )


def apply(pristine: dict[str, bytes], patches: list[Path]) -> dict[str, bytes]:
    """Pristine files + patches, applied in order by `git apply` (no fuzz, exact context),
    and the files the patches add."""
    with _file_tree(pristine) as (root, env):
        for patch in patches:
            before = _tree(root)
            result = _git_apply(root, env, patch)
            if result.returncode != 0:
                raise OverlayError(_describe_failure(patch, result.stderr))
            if _tree(root) == before:
                raise OverlayError(f"{patch.name} changes no file of the wheel")
        return {rel: (root / rel).read_bytes() for rel in [*pristine, *added_files(patches)]}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


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


def overlay_mismatches(patched: dict[str, bytes]) -> str:
    """A unified diff of every overlay file that differs from pristine + patches ('' if none)."""
    out = []
    for rel, expected in patched.items():
        overlay_file = OVERLAY / rel
        actual = overlay_file.read_bytes() if overlay_file.exists() else b""
        if actual != expected:
            out.append(text_diff(expected, actual, f"pristine+patches/{rel}", f"overlay/{rel}"))
    return "".join(out)


def text_diff(old: bytes, new: bytes, fromfile: str, tofile: str) -> str:
    """A unified diff of two versions of a text file."""
    return "".join(
        difflib.unified_diff(
            old.decode().splitlines(keepends=True),
            new.decode().splitlines(keepends=True),
            fromfile=fromfile,
            tofile=tofile,
        )
    )


def check(pristine: dict[str, bytes], patches: list[Path]) -> dict:
    """Apply the series and require the overlay to equal the result, with no other
    file in it; return the result."""
    patched = apply(pristine, patches)
    refuse_strays(list(patched))
    diff = overlay_mismatches(patched)
    if diff:
        raise OverlayError(
            "overlay differs from pristine + patches: overlay/ is written by scripts/patch-queue "
            "export; make changes in the patch queue (import, commit, export)",
            detail=diff,
        )
    return patched
