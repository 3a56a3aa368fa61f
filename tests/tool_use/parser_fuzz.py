"""A hypothesis property test of Gemma4ToolParser, run inside a parser_worker child:
random and mutated tool-call texts; each must end within a bound, in non-streaming
and in token-by-token streaming extraction, and either parse to JSON arguments or
come back as content; no exception may leave the parser."""

from __future__ import annotations

import json
import signal

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from vllm.tool_parsers.gemma4_tool_parser import STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START

# Gemma4's argument syntax, piece by piece: what the parser's loops scan for.
PIECES = [
    "a",
    "key",
    ":",
    ",",
    "[",
    "]",
    "{",
    "}",
    STRING_DELIM,
    "1",
    "108",
    ".",
    "-",
    "e",
    "true",
    " ",
    "\n",
]
VALID = [
    f"location:{STRING_DELIM}Paris, France{STRING_DELIM},unit:{STRING_DELIM}celsius{STRING_DELIM}",
    f"items:[{STRING_DELIM}a]b{STRING_DELIM},[1,2.5,-3],{{x:108.2}}],flag:true",
    "nested:{inner:{deep:[[1],[2,[3]]]}},n:-1.5e-3",
]


class OverBound(BaseException):
    """Raised by the alarm; not an Exception, so the parser's handlers let it through."""


def _alarm(signum, frame):
    raise OverBound


bodies = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=24).map("".join),
    st.tuples(
        st.sampled_from(VALID),
        st.lists(st.tuples(st.integers(0, 80), st.integers(0, 3), st.sampled_from(PIECES)), max_size=4),
    ).map(lambda t: _mutate(*t)),
)


def _mutate(body: str, edits) -> str:
    """`body` with each edit applied: at a position, drop up to n characters, insert a piece."""
    for position, dropped, piece in edits:
        at = position % (len(body) + 1)
        body = body[:at] + piece + body[at + dropped :]
    return body


def texts():
    """A tool call around the body: with or without text before it; closed, unclosed,
    or with a doubled closing brace."""
    ends = ["}" + TOOL_CALL_END, "}", "}}" + TOOL_CALL_END]
    parts = st.tuples(st.sampled_from(["", "Sure. "]), bodies, st.sampled_from(ends))
    return parts.map(lambda t: f"{t[0]}{TOOL_CALL_START}call:f{{{t[1]}{t[2]}")


def run(parser_class, tokenizer, req, stream, examples: int, bound: float) -> dict:
    """Run the property over `examples` inputs (fixed seed); a report of what ran."""
    counts = {"inputs": 0, "tool_calls": 0, "content": 0}
    signal.signal(signal.SIGALRM, _alarm)

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(texts())
    def prop(text):
        counts["inputs"] += 1
        signal.setitimer(signal.ITIMER_REAL, bound)
        try:
            info = parser_class(tokenizer).extract_tool_calls(text, req)
            ids = tokenizer.encode(text, add_special_tokens=False)
            stream(parser_class, tokenizer, req, ids, list(range(1, len(ids))))
        except OverBound:
            raise AssertionError(f"over {bound} s: {text!r}") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if info.tools_called:
            counts["tool_calls"] += 1
            assert all(isinstance(json.loads(c.function.arguments), dict) for c in info.tool_calls)
        else:
            counts["content"] += 1
            assert info.content == text

    try:
        prop()
    except AssertionError as failure:
        return {**counts, "failure": str(failure)}
    return counts
