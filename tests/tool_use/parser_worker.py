"""Runs vLLM's Gemma4ToolParser on the cases a test sends, one forked child per case.

    python parser_worker.py TOKENIZER_DIR

run by the test environment's Python with the vLLM under test first on its path.
It loads vLLM's general plugins (as vLLM's API server does before it builds a
tool parser), imports vllm.tool_parsers.gemma4_tool_parser, loads the tokenizer
with vLLM's get_tokenizer and prints {"ready": <the parser module's file>}.
Each message is one line, MARK and JSON.

Then per JSON line on stdin (a case) it forks a child and prints {"pid": PID}; the
child runs the case and prints {"result": ..., "seconds": ...}; when the child
ends, by itself or killed by the test, the worker prints {"exit": status} (the
negative signal number if killed). A case that loops forever is the test's to
kill, by that PID.

Cases:
  {"op": "extract", "text": T}: extract_tool_calls(T) (the non-streaming path)
  {"op": "stream", "text": T, "split": S}: T's token ids cut into deltas, fed to
    extract_tool_calls_streaming the way vLLM's chat completion server does
    (current = previous + delta); S "tokens": one stream, a token per delta;
    S "two": one stream per token boundary, cut there into two deltas
  {"op": "fuzz", "examples": N, "bound": B}: parser_fuzz's property test
"""

from __future__ import annotations

import json
import os
import sys
import time

MARK = "@@gemma4-parser "  # vLLM logs to stdout too


def emit(message: dict) -> None:
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def chat_request():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    return ChatCompletionRequest(
        model="gemma4", messages=[{"role": "user", "content": "call f"}], tools=[tool]
    )


def extract(parser_class, tokenizer, req, text: str) -> dict:
    info = parser_class(tokenizer).extract_tool_calls(text, req)
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in info.tool_calls]
    return {"tools_called": info.tools_called, "content": info.content, "calls": calls}


def splits(tokens: int, split: str) -> list[list[int]]:
    """The token indices at which each stream is cut into deltas."""
    return [list(range(1, tokens))] if split == "tokens" else [[k] for k in range(1, tokens)]


def stream(parser_class, tokenizer, req, ids: list[int], cuts: list[int]) -> dict:
    """The client's view of one streamed response: content and, per tool call
    index, the name and the concatenated argument deltas."""
    bounds = [0, *cuts, len(ids)]
    parser = parser_class(tokenizer)
    previous_text, previous_ids = "", []
    content, calls = "", {}
    for start, end in zip(bounds, bounds[1:]):
        delta_ids = ids[start:end]
        delta_text = tokenizer.decode(delta_ids, skip_special_tokens=False)
        current_text, current_ids = previous_text + delta_text, previous_ids + delta_ids
        delta = parser.extract_tool_calls_streaming(
            previous_text, current_text, delta_text, previous_ids, current_ids, delta_ids, req
        )
        previous_text, previous_ids = current_text, current_ids
        if delta is None:
            continue
        content += delta.content or ""
        for call in delta.tool_calls or []:
            function = call.function if isinstance(call.function, dict) else call.function.model_dump()
            entry = calls.setdefault(call.index, {"name": None, "arguments": "", "deltas": []})
            entry["name"] = entry["name"] or function.get("name")
            if function.get("arguments"):
                entry["arguments"] += function["arguments"]
                entry["deltas"].append(function["arguments"])
    return {"content": content, "calls": [calls[i] for i in sorted(calls)]}


def main() -> None:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import vllm.tool_parsers.gemma4_tool_parser as parser_module
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(sys.argv[1])
    parser_class = parser_module.Gemma4ToolParser
    req = parser_class(tokenizer).adjust_request(chat_request())
    emit({"ready": parser_module.__file__})
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            started = time.perf_counter()
            if case["op"] == "extract":
                result = extract(parser_class, tokenizer, req, case["text"])
            elif case["op"] == "fuzz":
                import parser_fuzz

                result = parser_fuzz.run(
                    parser_class, tokenizer, req, stream, case["examples"], case["bound"]
                )
            else:
                ids = tokenizer.encode(case["text"], add_special_tokens=False)
                cuts = splits(len(ids), case["split"])
                result = [stream(parser_class, tokenizer, req, ids, c) for c in cuts]
            emit({"result": result, "seconds": time.perf_counter() - started})
            os._exit(0)
        emit({"pid": pid})
        _, status = os.waitpid(pid, 0)
        emit({"exit": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
