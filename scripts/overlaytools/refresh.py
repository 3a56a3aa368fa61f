"""scripts/refresh-patches: regenerate patches/ from overlay/, or overlay/ from patches/."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import fetch, lock, patching, sources
from .errors import OverlayError, report
from .fetch import log

PROG = "refresh-patches"
# The same options made the committed patches; together with an isolated git
# configuration they make the output depend only on the files and messages.
FORMAT_PATCH = ["format-patch", "-q", "--no-signature", "--zero-commit", "-N"]


@dataclass(frozen=True)
class Message:
    """A patch's authorship and commit message, as `git mailinfo` reads them."""

    author: str
    email: str
    date: str
    text: str  # subject, blank line, body


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Regenerate patches/ from the overlay files against the pristine "
        "pinned vLLM source, keeping each patch's message, author and date. Run it "
        "after editing an overlay file.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="change nothing; fail if patches/ is not what a refresh would write")
    mode.add_argument("--overlays", action="store_true",
                      help="the other direction: rewrite overlay/ as pristine + patches/ "
                      "(after editing a patch by hand)")
    fetch.add_cache_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        refresh(args)
    except OverlayError as exc:
        return report(PROG, exc)
    return 0


def refresh(args: argparse.Namespace) -> None:
    pins = lock.load()
    patches = patching.series()
    members = patching.touched_files(patches)
    cache = args.cache_dir or fetch.default_cache_dir()
    pristine = sources.pinned_pristine(pins, members, cache, args.offline)
    if args.overlays:
        _write_overlays(patching.apply(pristine, patches))
        return
    fresh = regenerate(pristine, patches)
    current = {p.name: p.read_bytes() for p in patches}
    if args.check:
        if list(fresh.items()) != list(current.items()):
            raise OverlayError(
                "patches/ does not match overlay/ + the pristine source: after editing an "
                "overlay run scripts/refresh-patches; after editing a patch run "
                "scripts/refresh-patches --overlays",
                detail=_patch_diff(current, fresh),
            )
        log(f"{len(patches)} patches are up to date with overlay/")
        return
    _write_patches(patches, fresh)


def regenerate(pristine: dict[str, bytes], patches: list[Path]) -> dict[str, bytes]:
    """format-patch output, one patch per existing patch: pristine -> overlay for its files."""
    owned = _ownership(patches)
    with tempfile.TemporaryDirectory(prefix="refresh-patches-") as tmp:
        work = Path(tmp) / "tree"
        git = _git_in(work)
        git("init", "-q")
        patching.write_files(work, pristine)
        git("add", "-A")
        git("commit", "-q", "-m", "pristine")
        for patch in patches:
            message = read_message(patch)
            overlay = {rel: _overlay_file(rel) for rel in owned[patch]}
            patching.write_files(work, overlay)
            git("add", "-A")
            if git("diff", "--cached", "--quiet", check=False).returncode == 0:
                raise OverlayError(
                    f"{patch.name}: {', '.join('overlay/' + rel for rel in owned[patch])} "
                    "equals the pristine file; drop the patch from patches/series"
                )
            env = {"GIT_AUTHOR_NAME": message.author, "GIT_AUTHOR_EMAIL": message.email,
                   "GIT_AUTHOR_DATE": message.date}  # fmt: skip
            git("commit", "-q", "-F", "-", input=message.text, env=env)
        out = Path(tmp) / "out"
        git(*FORMAT_PATCH, "-o", str(out), f"HEAD~{len(patches)}")
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def read_message(patch: Path) -> Message:
    """Author, date and message of a format-patch file, via `git mailinfo -b`
    (-b strips only [PATCH], keeping vLLM's [Bugfix][Model] subject tags)."""
    with tempfile.TemporaryDirectory() as tmp:
        msg = Path(tmp) / "msg"
        with open(patch, "rb") as stdin:
            result = subprocess.run(
                ["git", "mailinfo", "-b", str(msg), os.devnull],
                stdin=stdin, capture_output=True, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise OverlayError(f"{patch.name}: git mailinfo failed: {result.stderr.decode().strip()}")
        fields = dict(
            line.split(": ", 1) for line in result.stdout.decode().splitlines() if ": " in line
        )
        missing = [f for f in ("Author", "Email", "Date", "Subject") if not fields.get(f)]
        if missing:
            raise OverlayError(f"{patch.name}: no {', '.join(missing)} in its header")
        body = msg.read_text()
        return Message(fields["Author"], fields["Email"], fields["Date"],
                       f"{fields['Subject']}\n\n{body}")  # fmt: skip


def _ownership(patches: list[Path]) -> dict[Path, list[str]]:
    """Each patch's files; a file changed by two patches cannot be split from one overlay."""
    owned, seen = {}, {}
    for patch in patches:
        owned[patch] = patching.touched_files([patch])
        for rel in owned[patch]:
            if rel in seen:
                raise OverlayError(
                    f"{rel} is changed by both {seen[rel].name} and {patch.name}; "
                    "refresh-patches needs each file in one patch"
                )
            seen[rel] = patch
    return owned


def _overlay_file(rel: str) -> bytes:
    path = patching.OVERLAY / rel
    if not path.is_file():
        raise OverlayError(f"overlay/{rel} is missing")
    return path.read_bytes()


def _git_in(work: Path):
    """A git runner for `work` that ignores the user's and system's git configuration."""
    work.mkdir(parents=True)
    base_env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": str(work.parent),
        "GIT_COMMITTER_NAME": "refresh-patches", "GIT_COMMITTER_EMAIL": "refresh-patches@invalid",
        "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
        "GIT_AUTHOR_NAME": "refresh-patches", "GIT_AUTHOR_EMAIL": "refresh-patches@invalid",
        "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    }  # fmt: skip

    def git(*args: str, input: str | None = None, env: dict | None = None, check: bool = True):
        result = subprocess.run(["git", *args], cwd=work, env={**base_env, **(env or {})},
                                input=input, capture_output=True, text=True)  # fmt: skip
        if check and result.returncode != 0:
            raise OverlayError(f"git {args[0]} failed: {result.stderr.strip()}")
        return result

    return git


def _replace(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically; False if it already held exactly that."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _write_patches(old: list[Path], fresh: dict[str, bytes]) -> None:
    for name, data in fresh.items():
        log(f"{'updated' if _replace(patching.PATCHES / name, data) else 'unchanged'} "
            f"patches/{name}")  # fmt: skip
    _replace(patching.PATCHES / "series", "".join(f"{n}\n" for n in fresh).encode())
    for stale in old:
        if stale.name not in fresh:  # a changed subject renames the file
            stale.unlink()
            log(f"removed patches/{stale.name}")


def _write_overlays(patched: dict[str, bytes]) -> None:
    for rel, data in patched.items():
        path = patching.OVERLAY / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"{'updated' if _replace(path, data) else 'unchanged'} overlay/{rel}")


def _patch_diff(current: dict[str, bytes], fresh: dict[str, bytes]) -> str:
    return "".join(
        patching.text_diff(current.get(name, b""), fresh.get(name, b""),
                           f"patches/{name}", f"refreshed/{name}")
        for name in sorted(set(current) | set(fresh))
        if current.get(name) != fresh.get(name)
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
