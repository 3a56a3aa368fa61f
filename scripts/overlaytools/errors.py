"""The one kind of failure the tools report to the user, and how they report it."""

from __future__ import annotations

import sys


class OverlayError(Exception):
    """A failure the user can act on; its message is the one line we print."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # printed after the message, e.g. a diff


def report(prog: str, exc: OverlayError) -> int:
    """Print `prog: error: message` (then any detail) to stderr; the exit status."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    if exc.detail:
        print(exc.detail, file=sys.stderr, end="" if exc.detail.endswith("\n") else "\n")
    return 1
