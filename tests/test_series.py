"""patches/series in quilt's format: what the tools read, refuse and write."""

from __future__ import annotations

import os
import subprocess

import pytest
from build_helpers import copy_repo, run_build, run_script
from series_helpers import PATCHES

VERIFY = ["--verify-only", "--offline", "--flavour", "cpu", "--arch", "x86_64"]
NAMES = [p.name for p in PATCHES]
HEADER = "# The MoE fixes, in order.\n\n"
# Comments after a name and blank lines between names, as quilt allows.
ANNOTATED = HEADER + "".join(f"{name} -p1  # fix {n}\n\n" for n, name in enumerate(NAMES, 1))


def error_line(result, prog: str) -> str:
    assert result.returncode == 1, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_comments_blank_lines_and_p1_are_read(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "patches" / "series").write_text(ANNOTATED)
    build = run_build(*VERIFY, repo=repo)
    assert build.returncode == 0, build.stderr
    assert f"{len(NAMES)} patches apply" in build.stderr
    check = run_script(repo, "patch-queue", "check", "--offline")
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "entry, message",
    [
        ("../outside.patch", "'../outside.patch' leaves patches/"),
        ("/tmp/outside.patch", "'/tmp/outside.patch' leaves patches/"),
        ("more/inside.patch", "'more/inside.patch' leaves patches/"),
        (f"{NAMES[0]} -p0", "option '-p0' is not supported: every patch applies with -p1"),
        (f"{NAMES[0]} -R  # reversed", "option '-R' is not supported"),
        (NAMES[0], f"{NAMES[0]} is listed twice"),
    ],
)
def test_bad_entries_are_refused_by_line(tmp_path, entry, message):
    repo = copy_repo(tmp_path / "repo")
    series = repo / "patches" / "series"
    series.write_text(series.read_text() + entry + "\n")
    line = len(series.read_text().splitlines())
    for result, prog in (
        (run_build(*VERIFY, repo=repo), "build.sh"),
        (run_script(repo, "patch-queue", "check", "--offline"), "patch-queue"),
    ):
        assert f"patches/series line {line}: {message}" in error_line(result, prog)


def test_export_keeps_the_header_comments(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    series = repo / "patches" / "series"
    series.write_text(ANNOTATED)
    assert run_script(repo, "patch-queue", "import", "--offline").returncode == 0
    export = run_script(repo, "patch-queue", "export", "--offline")
    assert export.returncode == 0, export.stderr
    assert series.read_text() == ANNOTATED  # the same patches: the series is left alone

    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=repo / ".patch-queue", env=env, check=True)
    export = run_script(repo, "patch-queue", "export", "--offline")
    assert export.returncode == 0, export.stderr
    assert series.read_text() == HEADER + "".join(f"{name}\n" for name in NAMES[:-1])
    assert "comments and options after the first patch name were not kept" in export.stderr
