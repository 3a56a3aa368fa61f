"""Quantized tiny Gemma4 MoE checkpoints (tests/make-tiny-checkpoints, written by
tests/quantization/quantized_gemma4.py) under `vllm serve` on the GPU, in this
process's variant, bfloat16, eager.

- Pristine 0.19.1 stops loading the compressed-tensors W4A16 checkpoint with
  vllm#40247's KeyError (..._proj_packed) and the ModelOpt NVFP4 one with the
  doubled .moe.moe. prefix of PR #41206. The AWQ checkpoint's per-expert
  .qweight/.qzeros/.scales names are the ones 0.19.1 already maps: it loads on
  every variant (the patched mapping must keep doing so), but without PR #42483
  its Marlin MoE runs SiLU experts, whatever the model's activation.
- Where it loads, the server answers, and vLLM names the MoE method it picked on
  Hopper: CompressedTensorsWNA16MarlinMoEMethod, awq_marlin's MoE, NVFP4 through
  Marlin (FlashInfer's NVFP4 backends are switched off: the kit has no FlashInfer).
- Its greedy logprobs agree with transformers' float64 run of the same model with
  the experts dequantized and running what this variant's experts should run (the
  quantization's own error is thus not in the comparison, only the GPU's bfloat16
  arithmetic); and their top logprobs are closer to that than the float model's are,
  which measures the quantization's error beside the noise. For AWQ they are also
  further from the reference with the other activation (SiLU, or the model's GELU
  where the variant lacks #42483).

Also: online dynamic FP8 Gemma4MoE at 26B-A4B's sizes keeps the TRITON FP8 MoE
backend that it has on pristine 0.19.1.
"""

from __future__ import annotations

import gpu_env
import pytest

if reason := gpu_env.unavailable():
    pytest.skip(reason, allow_module_level=True)

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from build_helpers import REPO  # noqa: E402
from series_helpers import fix_of  # noqa: E402
from serve_helpers import (  # noqa: E402
    Completion,
    assert_logprobs_close,
    greedy_completion,
    server_env,
    start_server,
    stop,
    transformers_greedy,
    wait_until_healthy,
)

sys.path.insert(0, str(REPO / "tests" / "quantization"))
import quantized_gemma4  # noqa: E402
import tiny_gemma4  # noqa: E402

PACKED_FIX = fix_of("https://github.com/vllm-project/vllm/pull/40708")
PREFIX_FIX = fix_of("https://github.com/vllm-project/vllm/pull/41206")
AWQ_ACTIVATION_FIX = fix_of("https://github.com/vllm-project/vllm/pull/42483")
TANH_FIX = fix_of("https://github.com/vllm-project/vllm/pull/41574")
# format -> (the fix its load needs or None, pristine's symptom, the log line of the MoE method)
FORMATS = {
    "w4a16": (
        PACKED_FIX,
        r"KeyError: '\S*experts\.\d+\.(gate|up|down)_proj_packed'",
        "Using CompressedTensorsWNA16MarlinMoEMethod",
    ),
    "awq": (None, "", "awq_marlin"),
    "nvfp4": (PREFIX_FIX, r"KeyError: '\S*\.moe\.moe\.experts\.\d+\.", "Using 'MARLIN' NvFp4 MoE backend"),
}
# What AWQ logs where its Marlin MoE does not take the layer (it would run MoeWNA16).
AWQ_FALLBACK = "is not supported by AWQMoeMarlin"
PROMPT = [tiny_gemma4.token_id("<bos>"), *b"The quick brown fox"]
MAX_TOKENS, TOP_K = 8, 5
# bfloat16 activations and the Marlin GEMMs against float64, over two layers: the
# bound each greedy logprob must meet. The quantization's own effect on the same
# logprobs, float model against dequantized (transformers, float64, CPU, measured
# 2026-12-01, top-5 over 13 positions): mean 0.19 (w4a16), 0.26 (awq), 0.21 (nvfp4).
LOGPROB_ATOL = 0.1
FLAGS = [
    "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
    "--gpu-memory-utilization", "0.04", "--kv-cache-memory-bytes", str(64 << 20),
]  # fmt: skip


def has_fix(patch) -> bool:
    return patch is None or gpu_env.has_fix(patch)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run(
        [sys.executable, str(REPO / "tests/make-tiny-checkpoints"), str(out)], check=True, capture_output=True
    )
    return out


def model_gelu() -> str:
    """The experts' GELU of this variant's Gemma4MoE (transformers' ACT2FN name): tanh
    with #41574, pristine's exact GELU without."""
    return "gelu_pytorch_tanh" if has_fix(TANH_FIX) else "gelu"


def experts_activation(fmt: str) -> str:
    """What this variant's quantized experts compute: the model's GELU, except AWQ's
    Marlin MoE without #42483, which runs SiLU."""
    return "silu" if fmt == "awq" and not has_fix(AWQ_ACTIVATION_FIX) else model_gelu()


def reference(state: dict[str, torch.Tensor], activation: str) -> Completion:
    """transformers' greedy run of the tiny Gemma4 with these weights and experts'
    activation, float64, CPU."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**tiny_gemma4.CONFIG)
    config._experts_implementation = "eager"  # the grouped GEMM takes no float64
    model = Gemma4ForCausalLM(config).double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    model.tie_weights()
    tiny_gemma4.set_experts_activation(model, activation)
    return transformers_greedy(model, PROMPT, MAX_TOKENS, TOP_K)


def mean_logprob_gap(a: Completion, b: Completion) -> float:
    """Mean |difference| of the top logprobs both runs list, over every step."""
    gaps = [abs(x[t] - y[t]) for x, y in zip(a.top, b.top, strict=True) for t in x.keys() & y.keys()]
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_checkpoint(checkpoints, tmp_path, fmt):
    fix, symptom, method = FORMATS[fmt]
    model = checkpoints / f"{tiny_gemma4.NAME}-{fmt}"
    env = server_env({"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "VLLM_USE_FLASHINFER_MOE_FP4": "0"})
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        str(model),
        "--served-model-name",
        fmt,
    ]
    server = start_server([*command, *FLAGS], gpu_env.server_logs(tmp_path) / f"quantized-{fmt}.log", env)
    try:
        if not has_fix(fix):
            with pytest.raises(RuntimeError, match="server exited"):
                wait_until_healthy(server)
            assert re.search(symptom, server.log.read_text(errors="replace")), server.log_tail()
            return
        wait_until_healthy(server)
        got = greedy_completion(server, fmt, PROMPT, MAX_TOKENS, TOP_K)
    finally:
        stop(server)
    log = server.log.read_text(errors="replace")
    assert method in log and AWQ_FALLBACK not in log, server.log_tail()

    source = checkpoints / tiny_gemma4.NAME
    from safetensors.torch import load_file

    float_state = load_file(source / "model.safetensors")
    _, dequantized = quantized_gemma4.quantize(float_state, fmt)
    activation = experts_activation(fmt)
    expected, unquantized = reference(dequantized, activation), reference(float_state, activation)
    noise, signal = mean_logprob_gap(got, expected), mean_logprob_gap(unquantized, expected)
    gaps = {"vllm_vs_dequantized": noise, "float_vs_dequantized": signal}
    if fmt == "awq":  # the activation the experts would run with the other variant
        other = model_gelu() if activation == "silu" else "silu"
        gaps[f"vllm_vs_dequantized_{other}"] = mean_logprob_gap(got, reference(dequantized, other))
    gpu_env.record("quantized-gemma4", format=fmt, method=method, activation=activation, **gaps)
    print(json.dumps({"format": fmt, "activation": activation, **gaps}))
    assert_logprobs_close(expected, got, LOGPROB_ATOL)
    assert noise < signal / 2, (noise, signal)
    if fmt == "awq":
        assert noise < gaps[f"vllm_vs_dequantized_{other}"] / 2, gaps


def test_online_fp8_gemma4_moe_keeps_the_triton_backend(tmp_path):
    """Fp8Config() (dynamic, from unquantized weights) Gemma4MoE at Gemma 4 26B-A4B's
    expert sizes: vLLM picks TRITON, as it did on pristine 0.19.1 (FACTS, H200)."""
    import cuda_layers
    import moe_layers
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    hf_config = moe_layers.gemma4_config(
        top_k=8, hidden_size=2816, num_experts=128, moe_intermediate_size=704
    )
    model_config = moe_layers.vllm_config(hf_config, tmp_path, torch.bfloat16).model_config
    config = VllmConfig(model_config=model_config, quant_config=Fp8Config())
    module = importlib.import_module("vllm.model_executor.models.gemma4")
    with cuda_layers.distributed(tmp_path):
        # Online FP8 makes its weights on the meta device (materialized while loading a
        # checkpoint); the backend is picked at construction.
        layer = cuda_layers.construct(
            lambda: module.Gemma4MoE(
                hf_config, quant_config=config.quant_config, prefix="model.layers.0.moe"
            ),
            config,
        )
        backend = layer.experts.quant_method.fp8_backend
    gpu_env.record("online-fp8-gemma4-moe", backend=backend.value)
    assert backend == Fp8MoeBackend.TRITON
