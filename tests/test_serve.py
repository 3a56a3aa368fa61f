"""`vllm serve` from the installed patched CPU wheel, on tiny random-weight Qwen3-MoE
checkpoints: the OpenAI endpoints, greedy outputs against Hugging Face transformers
(routed experts only) and against pristine vLLM 0.19.1 (with a shared expert, the
case the Qwen3 patch changes), tensor parallelism, bad requests and shutdown."""

from __future__ import annotations

import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import plugin_helpers
import pytest
import requests
from build_helpers import LOCK, REPO, upstream_path
from series_helpers import SERVED_MODULES
from serve_helpers import (
    VENV,
    Completion,
    Server,
    assert_logprobs_close,
    greedy_completion,
    running_server,
    server_env,
    token_id,
    transformers_greedy,
    upstream_api_server,
    vllm_serve,
)

PATCHED_VERSION = LOCK.patched_version(LOCK.pin, "cpu")
PLAIN, SHARED = "qwen3-moe-tiny", "qwen3-moe-tiny-shared"
QWEN3_MOE = "vllm/model_executor/models/qwen3_moe.py"
PROMPTS = ["The quick brown fox", "Hello, world!", "Mixture of experts: ", "Grüße ✓"]
MAX_TOKENS, TOP_K = 16, 5
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank


@dataclass
class ServedRun:
    """What a server that has since been stopped answered."""

    version: str
    completions: list[Completion]
    server: Server


# ---- checkpoints and commands --------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(
        [str(VENV / "bin/python"), str(REPO / "tests/make-tiny-checkpoints"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def serve_and_complete(command: list[str], model: str, log: Path, env: dict[str, str]) -> ServedRun:
    """Start a server, take greedy completions of PROMPTS, stop it."""
    with running_server(command, log, env) as server:
        version = server.get("/version").json()["version"]
        completions = [greedy_completion(server, model, p, MAX_TOKENS, TOP_K) for p in PROMPTS]
    return ServedRun(version, completions, server)


# ---- the patched server on the routed-experts-only checkpoint -------------------------


def test_console_script_reports_the_patched_version():
    result = subprocess.run(
        [str(VENV / "bin/vllm"), "--version"], env=server_env(), capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == PATCHED_VERSION


class TestPlainCheckpoint:
    @pytest.fixture(scope="class")
    def server(self, checkpoints, logs):
        with running_server(vllm_serve(checkpoints / PLAIN), logs / "plain.log", server_env()) as server:
            yield server

    @pytest.fixture(scope="class")
    def tokenizer(self, checkpoints):
        from transformers import AutoTokenizer  # here, not at collection: it imports torch

        return AutoTokenizer.from_pretrained(checkpoints / PLAIN)

    def test_version_endpoint(self, server):
        assert server.get("/version").json() == {"version": PATCHED_VERSION}

    def test_models_lists_the_checkpoint(self, server):
        models = server.get("/v1/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(PLAIN, 256)]

    def test_text_completion(self, server):
        prompt = "Grüße ✓"
        response = server.post(
            "/v1/completions",
            {
                "model": PLAIN,
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["choices"][0]["text"], str)
        assert body["choices"][0]["finish_reason"] == "length"
        # The byte-level tokenizer: one prompt token per UTF-8 byte.
        usage = body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt.encode()), 8)

    def test_chat_completion_follows_the_chat_template(self, server, tokenizer):
        messages = [{"role": "user", "content": "Which expert answers?"}]
        response = server.post(
            "/v1/chat/completions",
            {
                "model": PLAIN,
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": True,
                "return_tokens_as_token_ids": True,
            },
        )
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        chat_tokens = [token_id(step["token"]) for step in choice["logprobs"]["content"]]
        # Same greedy tokens as a plain completion of the rendered template.
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered.startswith("<|im_start|>user\n")
        prompt_ids = tokenizer(rendered)["input_ids"]
        assert response.json()["usage"]["prompt_tokens"] == len(prompt_ids)
        assert chat_tokens == greedy_completion(server, PLAIN, prompt_ids, 8, 1).tokens

    def test_greedy_logprobs_match_transformers(self, server, tokenizer, checkpoints):
        import torch
        from transformers import Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM.from_pretrained(checkpoints / PLAIN, dtype=torch.float32)
        for prompt in PROMPTS:
            prompt_ids = tokenizer(prompt)["input_ids"]
            reference = transformers_greedy(model.eval(), prompt_ids, MAX_TOKENS, TOP_K)
            served = greedy_completion(server, PLAIN, prompt_ids, MAX_TOKENS, TOP_K)
            assert_logprobs_close(reference, served, atol=1e-3)

    @pytest.mark.parametrize(
        "body, status",
        [
            ("{not json", 400),
            ({"model": PLAIN, "prompt": "x", "max_tokens": -1}, 400),
            ({"model": PLAIN, "prompt": "x" * 300, "max_tokens": 4}, 400),  # > max-model-len
            ({"model": "no-such-model", "prompt": "x", "max_tokens": 4}, 404),
        ],
        ids=["invalid-json", "negative-max-tokens", "prompt-too-long", "unknown-model"],
    )
    def test_bad_request_is_rejected_and_serving_goes_on(self, server, body, status):
        if isinstance(body, str):
            response = requests.post(
                server.url + "/v1/completions",
                data=body,
                timeout=60,
                headers={"Content-Type": "application/json"},
            )
        else:
            response = server.post("/v1/completions", body)
        assert response.status_code == status, response.text
        assert server.get("/health").status_code == 200
        assert len(greedy_completion(server, PLAIN, "ok", 2, 1).tokens) == 2


# ---- the shared-expert checkpoint: pristine 0.19.1, TP=1 and TP=2 -----------------------


@pytest.fixture(scope="module")
def pristine_vllm() -> Path:
    return plugin_helpers.pristine_vllm()


@pytest.fixture(scope="module")
def pristine_env(pristine_vllm) -> dict[str, str]:
    return server_env({"PYTHONPATH": str(pristine_vllm)})


@pytest.fixture(scope="module")
def patched_tp1(checkpoints, logs) -> ServedRun:
    return serve_and_complete(vllm_serve(checkpoints / SHARED), SHARED, logs / "shared-tp1.log", server_env())


@pytest.fixture(scope="module")
def patched_tp2(checkpoints, logs) -> ServedRun:
    command = vllm_serve(checkpoints / SHARED, "--tensor-parallel-size", "2")
    return serve_and_complete(command, SHARED, logs / "shared-tp2.log", server_env(TP2_ENV))


@pytest.fixture(scope="module")
def pristine_tp1(checkpoints, logs, pristine_env) -> ServedRun:
    return serve_and_complete(
        upstream_api_server(checkpoints / SHARED), SHARED, logs / "shared-pristine.log", pristine_env
    )


def test_pristine_server_runs_upstream_code(pristine_tp1, pristine_env, pristine_vllm):
    assert pristine_tp1.version == LOCK.pin
    found = subprocess.run(
        [
            str(VENV / "bin/python"),
            "-c",
            "import importlib.util; print(importlib.util.find_spec('vllm').origin)",
        ],
        env=pristine_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    package = Path(found).parent
    assert package == pristine_vllm / "vllm"
    with zipfile.ZipFile(upstream_path(plugin_helpers.pristine_artifact())) as wheel:
        assert (package.parent / QWEN3_MOE).read_bytes() == wheel.read(QWEN3_MOE)
    assert (package.parent / QWEN3_MOE).read_bytes() != (REPO / "overlay" / QWEN3_MOE).read_bytes()


def test_patched_matches_pristine_with_shared_experts(patched_tp1, pristine_tp1):
    assert patched_tp1.version == PATCHED_VERSION
    for patched, pristine in zip(patched_tp1.completions, pristine_tp1.completions, strict=True):
        assert patched.tokens == pristine.tokens
        assert patched.logprobs == pytest.approx(pristine.logprobs, abs=1e-4)


def test_tensor_parallel_matches_single_process(patched_tp1, patched_tp2):
    assert patched_tp2.version == PATCHED_VERSION
    for tp2, tp1 in zip(patched_tp2.completions, patched_tp1.completions, strict=True):
        assert tp2.tokens == tp1.tokens
        assert tp2.logprobs == pytest.approx(tp1.logprobs, abs=1e-3)


# ---- pristine 0.19.1 + the plugin wheel on the shared-expert checkpoint -----------------

PLUGIN_LOG = {"VLLM_LOGGING_LEVEL": "DEBUG"}  # the plugin names each module it serves at DEBUG
# The model file comes from the plugin, which serves nothing but model files.
SERVED = {"vllm.model_executor.models.qwen3_moe"}


@pytest.fixture(scope="module")
def plugin_tp1(checkpoints, logs) -> ServedRun:
    env = plugin_helpers.pristine_plugin_env(server_env(PLUGIN_LOG))
    return serve_and_complete(
        upstream_api_server(checkpoints / SHARED), SHARED, logs / "shared-plugin-tp1.log", env
    )


@pytest.fixture(scope="module")
def plugin_tp2(checkpoints, logs) -> ServedRun:
    command = [*upstream_api_server(checkpoints / SHARED), "--tensor-parallel-size", "2"]
    env = plugin_helpers.pristine_plugin_env(server_env({**TP2_ENV, **PLUGIN_LOG}))
    return serve_and_complete(command, SHARED, logs / "shared-plugin-tp2.log", env)


def test_plugin_on_pristine_matches_the_patched_wheel(plugin_tp1, patched_tp1):
    assert plugin_tp1.version == LOCK.pin  # upstream's own package
    for plugin, patched in zip(plugin_tp1.completions, patched_tp1.completions, strict=True):
        assert plugin.tokens == patched.tokens
        assert plugin.logprobs == pytest.approx(patched.logprobs, abs=1e-5)


def test_plugin_with_tensor_parallel_matches_the_patched_wheel(plugin_tp2, patched_tp1):
    for plugin, patched in zip(plugin_tp2.completions, patched_tp1.completions, strict=True):
        assert plugin.tokens == patched.tokens
        assert plugin.logprobs == pytest.approx(patched.logprobs, abs=1e-3)


@pytest.mark.parametrize(
    "run, loaders",
    [
        ("plugin_tp1", ["EngineCore"]),
        ("plugin_tp2", ["Worker_TP0", "Worker_TP1"]),
    ],
)
def test_plugin_applied_in_every_process(run, loaders, request):
    """Each process logged the INFO line; the ones that load the model imported qwen3_moe
    from the plugin, and no process got from it a module outside the plugin's own."""
    names, applied, served = plugin_helpers.plugin_log(request.getfixturevalue(run).server.log)
    for process in ["APIServer", "EngineCore", *loaders]:
        assert names[process] in applied, process
    for process in loaders:
        assert SERVED <= served.get(names[process], set()), process
    assert set().union(*served.values()) <= set(SERVED_MODULES), served


@pytest.mark.parametrize("run", ["patched_tp1", "patched_tp2", "pristine_tp1", "plugin_tp1", "plugin_tp2"])
def test_server_shuts_down_cleanly(run, request):
    server = request.getfixturevalue(run).server
    assert server.process.returncode == 0, server.log_tail()
    assert len(server.family) >= 2  # API server and engine core at least
    assert server.survivors() == []
