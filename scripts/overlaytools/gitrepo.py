"""The git the tools run: isolated from the user's configuration, with a fixed
committer, and the one way patches are written (format-patch) and read (am)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OverlayError
from .patching import write_files

# The same options made the committed patches; together with an isolated git
# configuration they make the output depend only on the trees and messages.
FORMAT_PATCH = ["format-patch", "-q", "--no-signature", "--zero-commit", "-N", "--abbrev=7"]
# --keep-non-patch strips only [PATCH] from a subject, keeping vLLM's [Bugfix][Model] tags.
AM = ["am", "-q", "--keep-non-patch"]
TOOL_IDENTITY = ("vllm-moe-overlay", "tools@vllm-moe-overlay.invalid", "2000-01-01T00:00:00+0000")


class Git:
    """Runs git in an existing directory, ignoring the user's and system's git
    configuration, with a fixed committer so the same work gives the same commits."""

    def __init__(self, work: Path) -> None:
        self.work = work
        name, email, date = TOOL_IDENTITY
        self.env = {
            **os.environ,
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CEILING_DIRECTORIES": str(work.resolve().parent),
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
            "GIT_COMMITTER_DATE": date,
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_AUTHOR_DATE": date,
        }

    def __call__(
        self, *args: str, input: str | None = None, env: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["git", *args],
            cwd=self.work,
            env={**self.env, **(env or {})},
            input=input,
            capture_output=True,
            text=True,
        )
        if check and result.returncode != 0:
            raise OverlayError(f"git {args[0]} failed in {self.work}: {_last_line(result.stderr)}")
        return result

    def out(self, *args: str) -> str:
        return self("-c", "core.quotePath=false", *args).stdout

    def am(self, patch: Path) -> None:
        """Commit one format-patch file with its author, date and message."""
        result = self(*AM, str(patch.resolve()), check=False)
        if result.returncode != 0:
            self("am", "--abort", check=False)
            output = result.stderr + result.stdout
            # git's own "error:" lines say why; the rest is advice on --continue/--abort.
            errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
            reason = errors[-1] if errors else _last_line(output)
            raise OverlayError(f"{patch.name} does not apply with git am: {reason}")

    def format_patches(self, revisions: str, out: Path) -> list[Path]:
        """`git format-patch` of the revisions into `out`, in order."""
        self(*FORMAT_PATCH, "-o", str(out), revisions)
        return sorted(out.iterdir())


@dataclass(frozen=True)
class Message:
    """A patch's authorship and commit message, as `git mailinfo` reads them."""

    author: str
    email: str
    date: str
    text: str  # subject, blank line, body


def read_message(patch: Path) -> Message:
    """Author, date and message of a format-patch file, via `git mailinfo -b`
    (-b strips only [PATCH], keeping vLLM's [Bugfix][Model] subject tags)."""
    with tempfile.TemporaryDirectory() as tmp:
        msg = Path(tmp) / "msg"
        with open(patch, "rb") as stdin:
            result = subprocess.run(
                ["git", "mailinfo", "-b", str(msg), os.devnull],
                stdin=stdin,
                capture_output=True,
                check=False,
            )
        if result.returncode != 0:
            raise OverlayError(f"{patch.name}: git mailinfo failed: {result.stderr.decode().strip()}")
        fields = dict(line.split(": ", 1) for line in result.stdout.decode().splitlines() if ": " in line)
        missing = [f for f in ("Author", "Email", "Date", "Subject") if not fields.get(f)]
        if missing:
            raise OverlayError(f"{patch.name}: no {', '.join(missing)} in its header")
        body = msg.read_text()
        return Message(fields["Author"], fields["Email"], fields["Date"], f"{fields['Subject']}\n\n{body}")


@contextmanager
def scratch_repo(files: dict[str, bytes]) -> Iterator[Git]:
    """A temporary repository whose one commit holds `files` (repository-relative)."""
    with tempfile.TemporaryDirectory(prefix="overlay-git-") as tmp:
        work = Path(tmp) / "tree"
        work.mkdir()
        git = Git(work)
        git("init", "-q")
        write_files(work, files)
        git("add", "-A")
        git("commit", "-q", "-m", "pristine")
        yield git


def normalize(pristine: dict[str, bytes], patches: list[Path]) -> dict[str, bytes]:
    """The patches as this project stores them: `git am` onto the pristine files,
    then `git format-patch` back. Name -> bytes, in series order."""
    with scratch_repo(pristine) as git:
        for patch in patches:
            git.am(patch)
        return read_patches(git, len(patches))


def read_patches(git: Git, count: int) -> dict[str, bytes]:
    """The last `count` commits of `git`, formatted as patches: name -> bytes."""
    with tempfile.TemporaryDirectory(prefix="overlay-patches-") as out:
        return {p.name: p.read_bytes() for p in git.format_patches(f"HEAD~{count}", Path(out))}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"
