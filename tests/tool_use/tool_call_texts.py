"""The tool-call texts the Gemma4 parser tests feed: malformed arguments that loop
pristine 0.19.1's parser (vLLM#41991), and an arguments object full of numbers with
its Gemma4 rendering (vLLM#42128)."""

from __future__ import annotations

import json

from gemma4_tokenizer import STRING_DELIM

MALFORMED = {
    # upstream's own (vllm#41991's tests): a partial array with a stray ]
    "pr-partial-array": ":[t:[]",
    # upstream's: a ] inside a string closed the nested array early
    "pr-bracket-in-string": 'a:[[<|"|>a]b<|"|>,<|"|>c<|"|>],<|"|>tail<|"|>]',
    # found by this overlay's bounded random search over Gemma4's syntax tokens
    "fuzz-1": "a:[}[]}",
    "fuzz-2": ",a:[a[]a",
    "fuzz-3": "a:[[}}[],[",
}

ARGUMENTS = {
    "lat": 108.2,
    "lon": -22.8,
    "count": 42,
    "offset": -7,
    "rate": 0.0015,
    "avogadro": 6.02e23,
    "tiny": -1.5e-07,
    "zero": 0.0,
    "whole": 2.0,
    "ratios": [0.5, -1.25, 3, 108.2],
    "point": {"x": -0.001, "y": 108.25},
    "version": "1.10",
    "zip": "00501",
    "code": "108.2",
    "minus": "-7",
}


def render(value) -> str:
    """Gemma4's notation of a JSON value."""
    if isinstance(value, str):
        return f"{STRING_DELIM}{value}{STRING_DELIM}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)
