"""Gemma4MoE's expert activation on the real FusedMoE, pristine 0.19.1 against the build.

The bug (fixed upstream by vllm#41574): Gemma4MoE built its FusedMoE with
activation="gelu", the exact (erf) GELU, while Gemma4 is trained with the tanh
approximation (`gelu_pytorch_tanh`). The layer's MoEActivation is what vLLM's
GPU experts (Triton, batched Triton, Marlin) hand to apply_moe_activation,
whose gated op (torch.ops._C.gelu_and_mul or gelu_tanh_and_mul) also runs on
the CPU; these tests run it there against a float64 reference.

The CPU MoE backend of 0.19.1 itself runs neither GELU: CPUFusedMOE and
SGLFusedMOE accept only the activations of _CPU_MOE_ACT_FN (silu, swigluoai),
so Gemma4MoE.forward stops on every CPU kernel path (upstream issue #43326).
The backport of vllm#42027 maps both GELUs to torch's F.gelu on the CPU torch
path (the compiled grouped GEMM and SGL kernels then decline them); the forward
test runs the whole layer there against the float64 reference, and expects
pristine's refusal where that patch is missing.

Which fixes a variant has comes from the series and, with the plugin, from its
manifest (series_helpers.fixes_of).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from moe_fixtures import installed_has
from moe_layers import TOP_K, build_gemma4_moe, gemma4_config, gemma4_inputs, load_variant, run, vllm_config
from references import gemma4_moe
from series_helpers import CPU_GELU_FIX, GELU_FIX
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe.activation import MoEActivation, apply_moe_activation

pytest_plugins = ["moe_fixtures"]

# The gated op in float32 against float64: a few float32 ulps. Exact and tanh
# GELU differ by up to 4.7e-4 (at x = -2.7); gelu(gate) * up on these inputs
# by 1.5e-3 to 3e-3 at most, far above it.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
# The whole layer against float64, as ||out - ref|| / ||ref||: float32 rounding through two
# GEMMs; bfloat16 weights, inputs and intermediates (8 significant bits).
FORWARD_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as transformers' gelu_pytorch_tanh."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + erf(x / sqrt(2))): the exact GELU."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gated_reference(gate_up: torch.Tensor, gelu) -> torch.Tensor:
    """vLLM's gated layout: the first half of w13's output is the gate, the second the up
    projection; the result is gelu(gate) * up, in float64."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gelu(gate) * up


@dataclass
class Gemma4:
    moe: torch.nn.Module
    config: VllmConfig
    weights: dict[str, torch.Tensor]  # float64, as loaded
    width: int  # moe_intermediate_size (one rank: all of it)
    expect_exact_gelu: bool  # the variant lacks the tanh-GELU fix
    expect_cpu_refusal: bool  # the installed CPU backend lacks the GELU activations


@pytest.fixture(scope="module")
def gemma4(variant, kernel, moe_workdir, vllm_distributed) -> Gemma4:
    """The variant's Gemma4MoE, built on the kernel's path."""
    hf_config = gemma4_config(moe_intermediate_size=kernel.case.moe_intermediate)
    config = vllm_config(hf_config, moe_workdir, kernel.dtype)
    module = load_variant(variant.name, "gemma4", moe_workdir)
    moe, weights = build_gemma4_moe(module, config, hf_config)
    kernel.check(moe.experts)
    cpu_refusal = not installed_has(CPU_GELU_FIX)
    return Gemma4(moe, config, weights, kernel.case.moe_intermediate, variant.lacks(GELU_FIX), cpu_refusal)


def test_experts_activation_is_tanh_gelu(gemma4):
    expected = MoEActivation.GELU if gemma4.expect_exact_gelu else MoEActivation.GELU_TANH
    assert gemma4.moe.experts.activation == expected


@pytest.mark.parametrize("tokens", [1, 64])
def test_experts_activation_matches_the_tanh_reference(gemma4, tokens):
    """apply_moe_activation with the layer's own activation, on w13-shaped outputs in
    float32: the build matches tanh GELU; pristine (with or without the plugin) matches
    exact GELU, not tanh."""
    moe, width = gemma4.moe, gemma4.width
    gate_up = 2 * torch.randn(tokens, 2 * width, generator=torch.Generator().manual_seed(tokens))
    out = torch.empty(tokens, width)
    apply_moe_activation(moe.experts.activation, out, gate_up)

    tanh, erf = gated_reference(gate_up, gelu_tanh), gated_reference(gate_up, gelu_erf)
    assert (tanh - erf).abs().max() > 1e-3  # the two references are told apart
    if gemma4.expect_exact_gelu:
        torch.testing.assert_close(out.double(), erf, **TOLERANCE)
        assert not torch.allclose(out.double(), tanh, **TOLERANCE)
    else:
        torch.testing.assert_close(out.double(), tanh, **TOLERANCE)


def test_gpu_experts_accept_the_activation(gemma4):
    """The backends vLLM may pick for Gemma4's experts on a GPU list the activation
    (otherwise no unquantized MoE backend would be found)."""
    from vllm.model_executor.layers.fused_moe.fused_batched_moe import BatchedTritonExperts
    from vllm.model_executor.layers.fused_moe.fused_marlin_moe import MarlinExpertsBase
    from vllm.model_executor.layers.fused_moe.fused_moe import TritonExperts

    for experts in (TritonExperts, BatchedTritonExperts, MarlinExpertsBase):
        assert experts._supports_activation(gemma4.moe.experts.activation), experts.__name__


@pytest.mark.parametrize("tokens", [1, 64])
def test_forward_on_the_cpu_backend(gemma4, tokens):
    """The whole layer on the CPU kernel path against the float64 reference with the
    layer's activation; where the installed CPU backend lacks the backport of vllm#42027
    (pristine vLLM + a plugin that does not carry it), vLLM's refusal (upstream #43326)."""
    moe, config, weights = gemma4.moe, gemma4.config, gemma4.weights
    dtype = config.model_config.dtype
    # 3x: gate pre-activations reach -2 to -4, where the two GELUs differ most
    hidden, logits = gemma4_inputs(tokens, seed=tokens, dtype=dtype, hidden_scale=3.0)
    activation = moe.experts.activation
    if gemma4.expect_cpu_refusal:
        with pytest.raises(AssertionError, match=f"{activation} is not supported"):
            run(moe, config, hidden, logits)
        return
    got = run(moe, config, hidden, logits).double()
    scale = weights["per_expert_scale"]
    expected = gemma4_moe(hidden, logits, weights, TOP_K, scale, activation.value)
    error = relative_error(got, expected)
    assert error < FORWARD_BOUND[dtype]
    if dtype == torch.float32:  # bfloat16's rounding is above the GELUs' difference
        other = "gelu" if activation.value == "gelu_tanh" else "gelu_tanh"
        # the other GELU lies over ten times further away
        assert relative_error(got, gemma4_moe(hidden, logits, weights, TOP_K, scale, other)) > 10 * error


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()
