"""`vllm serve` of the tiny Gemma4 MoE checkpoint with `--enable-auto-tool-choice
--tool-call-parser gemma4`, from this build's CPU wheel: chat completions with
`tools`, streaming and not, go through the server's real gemma4 tool-parser path,
and the server answers the next request too.

A random-weight model does not write tool calls by itself, so each request forces
the generated text with vLLM's own structured outputs (`structured_outputs:
{"choice": [text]}`): the engine samples exactly that text, which the server's tool
parser then reads as it would a model's. One of the forced texts is a malformed
call that makes pristine 0.19.1's parser loop forever (vLLM#41991).

Needs the gemma4-moe-tiny checkpoint of tests/make-tiny-checkpoints (and the CPU
MoE backend's tanh GELU, vLLM#42027); without the checkpoint the test says so.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests
from build_helpers import REPO
from gemma4_tokenizer import tool_call
from parser_variants import patched_vllm
from serve_helpers import SERVE_FLAGS, VENV, Server, running_server, server_env
from tool_call_texts import ARGUMENTS, MALFORMED, render

CHECKPOINT = "gemma4-moe-tiny"
TOOLS = [{"type": "function", "function": {"name": "set_position", "parameters": {"type": "object"}}}]
NUMBERS = tool_call("set_position", render({k: ARGUMENTS[k] for k in ("lat", "lon", "count", "code")})[1:-1])
HANGS = tool_call("set_position", MALFORMED["pr-bracket-in-string"])


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(
        [str(VENV / "bin/python"), str(REPO / "tests/make-tiny-checkpoints"), str(out)],
        check=True,
        capture_output=True,
    )
    model = out / CHECKPOINT
    if not model.is_dir():
        pytest.skip(
            f"tests/make-tiny-checkpoints makes no {CHECKPOINT} here (the Gemma4 checkpoint's branch)"
        )
    flags = [f if f != "256" else "512" for f in SERVE_FLAGS]  # the forced texts need room
    command = [
        str(VENV / "bin/python"),
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(model),
        "--served-model-name",
        CHECKPOINT,
        *flags,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "gemma4",
    ]
    env = server_env({"PYTHONPATH": str(patched_vllm())})
    with running_server(command, tmp_path_factory.mktemp("logs") / "gemma4-tools.log", env) as running:
        yield running


def chat(server: Server, forced: str, stream: bool) -> requests.Response:
    payload = {
        "model": CHECKPOINT,
        "messages": [{"role": "user", "content": "Where is it?"}],
        "tools": TOOLS,
        "max_tokens": len(forced) + 8,
        "temperature": 0,
        "stream": stream,
        "structured_outputs": {"choice": [forced]},
    }
    return requests.post(server.url + "/v1/chat/completions", json=payload, timeout=120, stream=stream)


def streamed_arguments(response: requests.Response) -> str:
    arguments = ""
    for line in response.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[len("data: ") :])["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                arguments += call.get("function", {}).get("arguments") or ""
    return arguments


def test_tool_call_non_streaming(server):
    response = chat(server, NUMBERS, stream=False)
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "set_position"
    expected = {k: ARGUMENTS[k] for k in ("lat", "lon", "count", "code")}
    assert json.dumps(json.loads(call["function"]["arguments"])) == json.dumps(expected)


def test_tool_call_streaming(server):
    with chat(server, NUMBERS, stream=True) as response:
        assert response.status_code == 200
        arguments = streamed_arguments(response)
    expected = {k: ARGUMENTS[k] for k in ("lat", "lon", "count", "code")}
    assert json.dumps(json.loads(arguments)) == json.dumps(expected)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_malformed_call_then_the_next_request(server, stream):
    """The text pristine's parser loops on is answered, and so is the next request."""
    with chat(server, HANGS, stream=stream) as response:
        assert response.status_code == 200
        if stream:
            streamed_arguments(response)
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    test_tool_call_non_streaming(server)
