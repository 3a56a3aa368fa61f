"""vLLM#42128 (issue #42047) on the real Gemma4ToolParser: streamed tool-call
arguments with numbers must reach the client exactly as generated.

Measured (TESTING.md): with deltas that only append, as vLLM's server sends them,
pristine 0.19.1 reassembles these arguments exactly too; its parser already
withholds a value at the end of the text. What #42128 changes there is a value that
ends in "." before a separator: pristine streams float("108.") as 108.0 before the
call ends, the precondition of the 108.2 -> 108.02 corruption #42047 reports;
test_trailing_dot_value_waits_for_the_call_end shows that.

The reference is the arguments object itself: the tool call's text is rendered from
it the way a Gemma4 chat template renders arguments (strings in <|"|>, other values
as JSON), and the client's concatenated argument deltas must parse to the same JSON,
types included (42 stays an int, 2.0 a float, "108.2" a string). Each stream is cut
at one token boundary into two deltas, for every boundary, and once a token per delta.
"""

from __future__ import annotations

import json

from gemma4_tokenizer import tool_call
from parser_variants import NUMBER_FIX
from tool_call_texts import ARGUMENTS, render

pytest_plugins = ["parser_fixtures"]


TEXT = tool_call("set_position", render(ARGUMENTS)[1:-1])
EXPECTED = json.dumps(ARGUMENTS)


def received(stream: dict) -> str:
    """The arguments the client reassembled, as canonical JSON (types kept)."""
    (call,) = stream["calls"]  # its name is not checked: see test_..._names
    try:
        return json.dumps(json.loads(call["arguments"]))
    except json.JSONDecodeError:
        return call["arguments"]  # not JSON at all: corrupt too


def test_streamed_numbers_arrive_as_generated(parser, variant):
    two = parser.run({"op": "stream", "text": TEXT, "split": "two"}, 120).result
    each = parser.run({"op": "stream", "text": TEXT, "split": "tokens"}, 120).result
    streams = [*two, *each]
    corrupt = [(k, received(s)) for k, s in enumerate(streams) if received(s) != EXPECTED]
    print(f"{variant.name}: {len(corrupt)} of {len(streams)} streams corrupt; first: {corrupt[:1]}")
    assert not corrupt


def test_trailing_dot_value_waits_for_the_call_end(parser, variant):
    """A generated "108." is streamed only with the call's end, not as 108.0 before."""
    text = tool_call("f", "left:108.,right:22.8")
    (stream,) = parser.run({"op": "stream", "text": text, "split": "tokens"}, 60).result
    (call,) = stream["calls"]
    assert json.loads(call["arguments"]) == {"left": 108.0, "right": 22.8}
    early = [d for d in call["deltas"][:-1] if "108" in d]
    assert bool(early) == variant.lacks(NUMBER_FIX), call["deltas"]


def test_non_streaming_numbers(parser):
    """The non-streaming path, on every variant: the reference for the streams."""
    info = parser.run({"op": "extract", "text": TEXT}, 60).result
    (call,) = info["calls"]
    assert json.dumps(json.loads(call["arguments"])) == EXPECTED
