"""The one kind of failure the tools report to the user, and how they report it."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

# Set to show the traceback behind a one-line error.
DEBUG_ENV = "VLLM_OVERLAY_DEBUG"


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


def describe(exc: BaseException) -> str:
    """One line naming the cause of an unexpected failure."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
    return f"{type(exc).__name__}: {exc}"


def run(prog: str, action: Callable[[], None], written: Callable[[], str]) -> int:
    """Run a tool's action; every failure ends in one line on stderr and a non-zero
    status (with the traceback too when $VLLM_OVERLAY_DEBUG is set). After an
    interruption or an unexpected failure (disk full, ...) `written()` says what
    was and was not written."""
    try:
        action()
    except OverlayError as exc:
        _debug()
        return report(prog, exc)
    except KeyboardInterrupt:
        _debug()
        print(f"{prog}: error: interrupted; {written()}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is still one line
        _debug()
        hint = "" if os.environ.get(DEBUG_ENV) else f" (set {DEBUG_ENV}=1 for the traceback)"
        print(f"{prog}: error: {describe(exc)}; {written()}{hint}", file=sys.stderr)
        return 1
    return 0


def _debug() -> None:
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc()
