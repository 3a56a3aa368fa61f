"""scripts/refresh-patches: regenerate patches/ from overlay/, or overlay/ from patches/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import fetch, gitrepo, lock, patching, sources, writeback
from .errors import OverlayError, run
from .fetch import log

PROG = "refresh-patches"


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
    return run(PROG, lambda: refresh(args), lambda: "each file it rewrote was replaced whole")


def refresh(args: argparse.Namespace) -> None:
    pins = lock.load()
    patches = patching.series()
    for patch in patches:
        patching.check_format(patch)
    members = patching.touched_files(patches)
    patching.refuse_strays(members)
    cache = args.cache_dir or fetch.default_cache_dir()
    pristine = sources.pinned_pristine(pins, members, cache, args.offline,
                                       patching.added_files(patches))  # fmt: skip
    if args.overlays:
        writeback.overlays(patching.apply(pristine, patches))
        return
    if args.check:
        check(pristine, patches)
        return
    writeback.patches([p.name for p in patches], regenerate(pristine, patches))


def check(pristine: dict[str, bytes], patches: list[Path]) -> None:
    """The drift guard: the overlay is pristine + patches, and the patches are
    stored as `git am` + `git format-patch` writes them (as refresh and export do)."""
    patching.check(pristine, patches)
    current = {p.name: p.read_bytes() for p in patches}
    fresh = gitrepo.normalize(pristine, patches)
    if list(fresh.items()) != list(current.items()):
        fix = ("scripts/patch-queue import, then scripts/patch-queue export"
               if _shared(patches) else "scripts/refresh-patches")  # fmt: skip
        raise OverlayError(
            f"patches/ is not in the form a refresh writes (after a hand edit?): run {fix}",
            detail=_patch_diff(current, fresh),
        )
    log(f"{len(patches)} patches are up to date with overlay/")


def regenerate(pristine: dict[str, bytes], patches: list[Path]) -> dict[str, bytes]:
    """format-patch output, one patch per existing patch: pristine -> overlay for its files.

    A file that several patches change cannot be split from its one overlay
    file; its hunks are kept as the patches have them, and an edit to it is
    refused (the patch queue is the place for it).
    """
    shared = _shared(patches)
    if shared:
        applied = patching.apply(pristine, patches)
        for rel, owners in shared.items():
            if _overlay_file(rel) != applied[rel]:
                raise OverlayError(
                    f"overlay/{rel} is changed by several patches ({', '.join(owners)}); "
                    "refresh-patches cannot tell which one an edit belongs to: undo the edit "
                    "and make it in the patch queue (scripts/patch-queue import, commit, "
                    "scripts/patch-queue export)"
                )
    with gitrepo.scratch_repo(pristine) as git:
        for patch in patches:
            files = patching.touched_files([patch])
            kept = [rel for rel in files if rel in shared]
            if kept:
                include = [f"--include={rel}" for rel in kept]
                git("apply", "--whitespace=nowarn", *include, str(patch.resolve()))
            own = [rel for rel in files if rel not in shared]
            patching.write_files(git.work, {rel: _overlay_file(rel) for rel in own})
            git("add", "-A")
            if git("diff", "--cached", "--quiet", check=False).returncode == 0:
                raise OverlayError(
                    f"{patch.name}: {', '.join('overlay/' + rel for rel in files)} "
                    "equals the pristine file; drop the patch from patches/series"
                )
            message = gitrepo.read_message(patch)
            env = {"GIT_AUTHOR_NAME": message.author, "GIT_AUTHOR_EMAIL": message.email,
                   "GIT_AUTHOR_DATE": message.date}  # fmt: skip
            git("commit", "-q", "-F", "-", input=message.text, env=env)
        return gitrepo.read_patches(git, len(patches))


def _shared(patches: list[Path]) -> dict[str, list[str]]:
    """Each file that several patches change -> the names of those patches."""
    owners: dict[str, list[str]] = {}
    for patch in patches:
        for rel in patching.touched_files([patch]):
            owners.setdefault(rel, []).append(patch.name)
    return {rel: names for rel, names in owners.items() if len(names) > 1}


def _overlay_file(rel: str) -> bytes:
    path = patching.OVERLAY / rel
    if not path.is_file():
        raise OverlayError(f"overlay/{rel} is missing")
    return path.read_bytes()


def _patch_diff(current: dict[str, bytes], fresh: dict[str, bytes]) -> str:
    return "".join(
        patching.text_diff(current.get(name, b""), fresh.get(name, b""),
                           f"patches/{name}", f"refreshed/{name}")
        for name in sorted(set(current) | set(fresh))
        if current.get(name) != fresh.get(name)
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
