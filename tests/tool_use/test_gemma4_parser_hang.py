"""vLLM#41991 on the real Gemma4ToolParser: malformed tool-call arguments made the
parser loop forever, in non-streaming and in streaming extraction, which holds the
API server's event loop for every client.

Pristine 0.19.1 must not return within HANG_WAIT (the test then kills the case's
process by its PID); the build must return within BOUND, having parsed the
arguments or handed the text back as content.
"""

from __future__ import annotations

import json

import pytest
from gemma4_tokenizer import tool_call
from parser_variants import HANG_FIX
from tool_call_texts import MALFORMED

pytest_plugins = ["parser_fixtures"]

# The patched parser takes milliseconds for these (TESTING.md); BOUND leaves
# room for a loaded machine. A pristine loop spins until killed: HANG_WAIT is over
# 400 times the slowest patched case.
BOUND = 2.0
HANG_WAIT = 5.0

TEXTS = {name: tool_call("f", body) for name, body in MALFORMED.items()}
# The arguments the fixed parser must give (upstream's expected value): the string
# element "a]b" stays one element.
PARSED = {"pr-bracket-in-string": {"a": [["a]b", "c"], "tail"]}}


def case(mode: str, text: str) -> dict:
    if mode == "extract":
        return {"op": "extract", "text": text}
    return {"op": "stream", "text": text, "split": "tokens"}


@pytest.mark.parametrize("mode", ["extract", "stream"])
@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_arguments_end(parser, variant, mode, name):
    text = TEXTS[name]
    outcome = parser.run(case(mode, text), HANG_WAIT if variant.lacks(HANG_FIX) else BOUND)
    if variant.lacks(HANG_FIX):
        assert outcome.result is None, f"pristine returned: {outcome}"
        assert outcome.exit == -9  # killed by its PID
        return
    assert outcome.result is not None, f"no answer within {BOUND} s"
    assert outcome.exit == 0 and outcome.seconds < BOUND
    print(f"{name} {mode}: {outcome.seconds * 1e3:.2f} ms")
    if mode == "extract":  # parsed to JSON arguments, or the text back as content
        info = outcome.result
        if info["tools_called"]:
            arguments = [json.loads(c["arguments"]) for c in info["calls"]]
            assert all(isinstance(a, dict) for a in arguments)
            if name in PARSED:
                assert arguments == [PARSED[name]]
        else:
            assert name not in PARSED and info["content"] == text
