"""The hypothesis fuzzer of the Gemma4 tool parser (parser_fuzz), with a fixed seed
(derandomize) and a fixed number of inputs: on the build every input ends within
BOUND, parses or comes back as content, and nothing raises; on pristine 0.19.1 the
same inputs include one that loops (vLLM#41991), which the bound stops."""

from __future__ import annotations

from parser_variants import HANG_FIX

pytest_plugins = ["parser_fixtures"]

EXAMPLES = 2000
BOUND = 2.0  # seconds per input, both extractions; the build takes milliseconds


def test_fuzzer(parser, variant):
    report = parser.run({"op": "fuzz", "examples": EXAMPLES, "bound": BOUND}, 1200).result
    print(f"{variant.name}: {report}")
    if variant.lacks(HANG_FIX):
        assert "over" in report.get("failure", ""), report
    else:
        assert "failure" not in report, report
        assert report["inputs"] >= EXAMPLES and report["tool_calls"] and report["content"]
