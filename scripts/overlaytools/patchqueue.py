"""scripts/patch-queue: the patch series as a git branch of commits on the pristine release.

The one way to change the series. `import` makes a repository whose `upstream` tag is the pin's pristine
vllm/**.py (from the hash-verified upstream wheel, so every blob is the
release's own and upstream patches apply with `git am -3`), with one commit
per patch on top. Maintainers rework it with plain git; `export` writes
patches/, patches/series and overlay/ back from upstream..HEAD. `check` is the
drift guard CI runs: overlay/ is pristine + patches, and the patches are in the
form export writes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import fetch, gitrepo, lock, patching, plugin_wheel, sources, writeback
from .errors import OverlayError, run
from .fetch import log

PROG = "patch-queue"
DEFAULT_DIR = lock.REPO / ".patch-queue"
BRANCH = "patches"
# Written into the .git of every queue `import` makes: `--force` replaces only such a directory.
MARKER = "vllm-moe-overlay-queue"
UPSTREAM = "upstream"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Edit the patch series as git commits. 'import' builds a git "
        "repository of the pinned release's pristine vllm/ sources (tag 'upstream') "
        "with one commit per patch; work there with plain git (commit, rebase -i "
        "upstream, cherry-pick, am -3 --keep-non-patch); 'export' writes patches/ and "
        "overlay/ back; 'check' (the drift guard) changes nothing and fails where "
        "patches/ or overlay/ is not what an export writes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("import", "create the queue from patches/series"),
        ("export", "write patches/, series and overlay/ from upstream..HEAD"),
        (
            "check",
            "change nothing; fail where overlay/ is not pristine + patches "
            "or a patch is not in the form export writes",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        if name != "check":
            sub.add_argument(
                "--dir",
                type=Path,
                default=DEFAULT_DIR,
                help="the queue's git repository [.patch-queue/ in the checkout]",
            )
        if name == "import":
            sub.add_argument(
                "--force", action="store_true", help="replace an existing queue (its commits are lost)"
            )
        if name == "export":
            sub.add_argument(
                "--detached",
                action="store_true",
                help=f"export a detached HEAD that is not {BRANCH}'s tip (its later patches leave patches/)",
            )
        fetch.add_cache_options(sub)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    action = {"import": import_queue, "export": export_queue, "check": check}[args.command]
    written = {
        "import": "the queue was not replaced",
        "check": "nothing was written",
        "export": "each file of patches/ or overlay/ it rewrote was replaced whole",
    }
    return run(PROG, lambda: action(args), lambda: written[args.command])


def upstream_subject(locked: lock.Lock) -> str:
    return f"vLLM {locked.pin}"


def import_queue(args: argparse.Namespace) -> None:
    locked = lock.load()
    dest = args.dir.absolute()
    if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir() or any(dest.iterdir())):
        if not args.force:
            raise OverlayError(
                f"{dest} exists and is not empty; pass --force to replace it (its commits are lost)"
            )
        if dest.is_symlink() or not (dest / ".git" / MARKER).is_file():
            raise OverlayError(
                f"{dest} is not a patch queue made by {PROG} import; not removing it with --force"
            )
    patches = patching.series()
    artifact, files = sources.release_sources(
        locked, args.cache_dir or fetch.default_cache_dir(), args.offline
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        git = gitrepo.Git(staging)
        git("init", "-q", "-b", BRANCH)
        (staging / ".git" / MARKER).write_text(f"made by scripts/{PROG} import\n")
        log(f"writing {len(files):,} files of vLLM {locked.pin} from {artifact.filename}")
        patching.write_files(staging, files)
        git("add", "-A")
        message = (
            f"{upstream_subject(locked)}\n\nThe pristine vllm/**.py files of "
            f"{artifact.filename}\n(sha256 {artifact.sha256}).\n"
        )
        git("commit", "-q", "-F", "-", input=message)
        git("tag", UPSTREAM)
        for patch in patches:
            git.am(patch)
            log(f"applied {patch.name}")
        if dest.exists():
            shutil.rmtree(dest)  # an empty directory, or a queue we made (checked above)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"{dest}: branch {BRANCH}, {len(patches)} patch commit(s) on tag {UPSTREAM} "
        f"(vLLM {locked.pin}); edit with git, then run scripts/patch-queue export"
    )


def export_queue(args: argparse.Namespace) -> None:
    locked = lock.load()
    git = _queue(args.dir, locked)
    if not args.detached:
        _refuse_detached(git, args.dir)
    commits = git.out("rev-list", "--reverse", f"{UPSTREAM}..HEAD").split()
    if not commits:
        raise OverlayError(f"{args.dir} has no commits on top of {UPSTREAM}: nothing to export")
    for commit in commits:
        _check_commit(git, commit)
    with tempfile.TemporaryDirectory(prefix="patch-queue-") as tmp:
        raw = git.format_patches(f"{UPSTREAM}..HEAD", Path(tmp) / "raw")
        for patch in raw:
            patching.check_format(patch)
        touched = patching.touched_files(raw)
        pristine = sources.pinned_pristine(
            locked,
            touched,
            args.cache_dir or fetch.default_cache_dir(),
            args.offline,
            patching.added_files(raw),
        )
        fresh = gitrepo.normalize(pristine, raw)
        staged = Path(tmp) / "patches"
        staged.mkdir()
        patching.write_files(staged, fresh)
        patched = patching.apply(pristine, [staged / name for name in fresh])
    for rel, data in patched.items():
        if data != git.out("show", f"HEAD:{rel}").encode():
            raise OverlayError(
                f"{rel} at HEAD is not pristine vLLM {locked.pin} + the exported "
                f"patches: is {UPSTREAM} the release? re-import the queue"
            )
    try:
        old = [p.name for p in patching.series()]
    except OverlayError:
        old = []
    changed = writeback.patches(old, fresh) + writeback.overlays(patched)
    if changed:
        log(
            f"exported {len(fresh)} patch(es) from {args.dir}; bump label in "
            "upstream.lock.json, then run ./build.sh and tests/run"
        )
    else:
        log(f"exported {len(fresh)} patch(es) from {args.dir}: patches/ and overlay/ were up to date")


def check(args: argparse.Namespace) -> None:
    """The drift guard: the overlay is pristine + patches, and the patches are
    stored as `git am` + `git format-patch` write them (as export does)."""
    locked = lock.load()
    patches = patching.series()
    for patch in patches:
        patching.check_format(patch)
    members = patching.touched_files(patches)
    patching.refuse_strays(members)
    pristine = sources.pinned_pristine(
        locked,
        members,
        args.cache_dir or fetch.default_cache_dir(),
        args.offline,
        patching.added_files(patches),
    )
    patching.check(pristine, patches)
    current = {p.name: p.read_bytes() for p in patches}
    fresh = gitrepo.normalize(pristine, patches)
    if list(fresh.items()) != list(current.items()):
        raise OverlayError(
            f"patches/ is not in the form an export writes (after a hand edit?): run scripts/{PROG} "
            f"import, then scripts/{PROG} export",
            detail=_patch_diff(current, fresh),
        )
    log(f"{len(patches)} patches are in export form and overlay/ is pristine + patches")


def _patch_diff(current: dict[str, bytes], fresh: dict[str, bytes]) -> str:
    return "".join(
        patching.text_diff(
            current.get(name, b""), fresh.get(name, b""), f"patches/{name}", f"exported/{name}"
        )
        for name in sorted(set(current) | set(fresh))
        if current.get(name) != fresh.get(name)
    )


def _queue(path: Path, locked: lock.Lock) -> gitrepo.Git:
    """The queue's git, once it is clean and based on the pin's upstream commit."""
    if not (path / ".git").exists():
        raise OverlayError(f"{path} is not a patch queue: create it with scripts/patch-queue import")
    git = gitrepo.Git(path)
    busy = [
        op
        for op in ("rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD", "MERGE_HEAD")
        if Path(path, git.out("rev-parse", "--git-path", op).strip()).exists()
    ]
    if busy:
        raise OverlayError(
            f"{path}: a git am, rebase, cherry-pick or merge is in progress; finish or abort it first"
        )
    dirty = git.out("status", "--porcelain", "--untracked-files=no")
    if dirty:
        first = dirty.splitlines()[0][3:]
        raise OverlayError(f"{path} has uncommitted changes ({first}, …): commit or stash them")
    if git("rev-parse", "-q", "--verify", f"{UPSTREAM}^{{commit}}", check=False).returncode:
        raise OverlayError(f"{path} has no tag {UPSTREAM!r}: re-import the queue")
    subject = git.out("log", "-1", "--format=%s", UPSTREAM).strip()
    if subject != upstream_subject(locked):
        raise OverlayError(
            f"{path}: {UPSTREAM} is {subject!r}, but the pin is vLLM {locked.pin}; re-import the queue"
        )
    if git("merge-base", "--is-ancestor", UPSTREAM, "HEAD", check=False).returncode:
        raise OverlayError(f"{path}: HEAD is not based on {UPSTREAM}; rebase it (git rebase {UPSTREAM})")
    merges = git.out("rev-list", "--merges", f"{UPSTREAM}..HEAD").split()
    if merges:
        raise OverlayError(
            f"{path}: {_describe(git, merges[0])} is a merge; the series must "
            f"be linear (git rebase {UPSTREAM})"
        )
    return git


def _refuse_detached(git: gitrepo.Git, path: Path) -> None:
    """Export writes upstream..HEAD: from a detached HEAD behind the branch, that silently
    drops the branch's later patches (and their overlays) from the checkout."""
    if git("symbolic-ref", "-q", "HEAD", check=False).returncode == 0:
        return  # on a branch
    head = git.out("rev-parse", "HEAD").strip()
    tip = git("rev-parse", "-q", "--verify", f"refs/heads/{BRANCH}", check=False).stdout.strip()
    if head == tip:
        return
    behind = (
        f", {git.out('rev-list', '--count', f'HEAD..{tip}').strip()} commit(s) behind {BRANCH}" if tip else ""
    )
    raise OverlayError(
        f"{path}: HEAD is detached at {_describe(git, head)}{behind}; export writes "
        f"{UPSTREAM}..HEAD, so the patches after it would leave patches/: check out {BRANCH} "
        "(git switch), or pass --detached to export HEAD as it is"
    )


def _check_commit(git: gitrepo.Git, commit: str) -> None:
    """A commit becomes a patch only with its provenance, and only if it changes or adds files."""
    if patching.origin(git.out("log", "-1", "--format=%B", commit)) is None:
        raise OverlayError(
            f"{_describe(git, commit)} has no 'Origin:' line: add its provenance (Origin, Bug, "
            "Applied-Upstream, Backport) to the message (git rebase -i upstream, reword)"
        )
    changes = git.out(
        "diff-tree", "-r", "--no-commit-id", "--no-renames", "--name-status", commit
    ).splitlines()
    if not changes:
        raise OverlayError(f"{_describe(git, commit)} changes nothing; drop it")
    for line in changes:
        status, rel = line.split("\t", 1)
        problem = patching.target_problem(rel)
        if problem is None and status != "D":
            try:
                plugin_wheel.module_name(rel)
            except OverlayError as exc:
                problem = str(exc)
        if problem:
            raise OverlayError(f"{_describe(git, commit)} changes {rel}, which the build refuses: {problem}")
        if status not in ("M", "A"):
            what = "deletes" if status == "D" else f"changes the type of ({status})"
            raise OverlayError(f"{_describe(git, commit)} {what} {rel}: {patching.ONLY_CHANGE_OR_ADD}")


def _describe(git: gitrepo.Git, commit: str) -> str:
    return "commit " + git.out("log", "-1", "--format=%h (%s)", commit).strip()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
