"""Gemma4MoE's expert activation on the real FusedMoE, pristine 0.19.1 against the build.

The bug (fixed upstream by vllm#41574): Gemma4MoE built its FusedMoE with
activation="gelu", the exact (erf) GELU, while Gemma4 is trained with the tanh
approximation (`gelu_pytorch_tanh`). The layer's MoEActivation is what vLLM's
GPU experts (Triton, batched Triton, Marlin) hand to apply_moe_activation,
whose gated op (torch.ops._C.gelu_and_mul or gelu_tanh_and_mul) also runs on
the CPU; these tests run it there against a float64 reference.

The CPU MoE backend of 0.19.1 itself runs neither GELU: CPUFusedMOE and
SGLFusedMOE accept only the activations of _CPU_MOE_ACT_FN (silu, swigluoai),
so Gemma4MoE.forward stops on every CPU kernel path, pristine and patched
alike (upstream issue #43326). The forward test skips there, saying so.

The fix changes the fused-MoE modules too. The plugin carries it (its startup hook
serves those modules from the first import of vllm, before this module imports them):
on pristine vLLM + the plugin these tests expect tanh GELU, with VLLM_PLUGINS=none
exact GELU, as series_helpers.fixes_of says.
"""

from __future__ import annotations

import math

import pytest
import torch
from moe_layers import HIDDEN, NUM_EXPERTS, build_gemma4_moe, gemma4_config, load_variant, run, vllm_config
from series_helpers import GELU_FIX
from vllm.model_executor.layers.fused_moe import cpu_fused_moe
from vllm.model_executor.layers.fused_moe.activation import MoEActivation, apply_moe_activation

pytest_plugins = ["moe_fixtures"]

# The gated op in float32 against float64: a few float32 ulps. Exact and tanh
# GELU differ by up to 4.7e-4 (at x = -2.7); gelu(gate) * up on these inputs
# by 1.5e-3 to 3e-3 at most, far above it.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


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


@pytest.fixture(scope="module")
def gemma4(variant, kernel, moe_workdir, vllm_distributed):
    """The variant's Gemma4MoE, built on the kernel's path, and whether the bug is expected
    (the variant lacks the fix)."""
    hf_config = gemma4_config(moe_intermediate_size=kernel.case.moe_intermediate)
    config = vllm_config(hf_config, moe_workdir, kernel.dtype)
    module = load_variant(variant.name, "gemma4", moe_workdir)
    moe = build_gemma4_moe(module, config, hf_config)
    kernel.check(moe.experts)
    return moe, config, variant.lacks(GELU_FIX), kernel.case.moe_intermediate  # one rank: all of it


def test_experts_activation_is_tanh_gelu(gemma4):
    moe, _, expect_bug, _ = gemma4
    assert moe.experts.activation == (MoEActivation.GELU if expect_bug else MoEActivation.GELU_TANH)


@pytest.mark.parametrize("tokens", [1, 64])
def test_experts_activation_matches_the_tanh_reference(gemma4, tokens):
    """apply_moe_activation with the layer's own activation, on w13-shaped outputs in
    float32: the build (and the plugin) matches tanh GELU; pristine (and the plugin
    turned off) matches exact GELU, not tanh."""
    moe, _, expect_bug, width = gemma4
    gate_up = 2 * torch.randn(tokens, 2 * width, generator=torch.Generator().manual_seed(tokens))
    out = torch.empty(tokens, width)
    apply_moe_activation(moe.experts.activation, out, gate_up)

    tanh, erf = gated_reference(gate_up, gelu_tanh), gated_reference(gate_up, gelu_erf)
    assert (tanh - erf).abs().max() > 1e-3  # the two references are told apart
    if expect_bug:
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

    moe, _, _, _ = gemma4
    for experts in (TritonExperts, BatchedTritonExperts, MarlinExpertsBase):
        assert experts._supports_activation(moe.experts.activation), experts.__name__


def test_forward_on_the_cpu_backend(gemma4):
    moe, config, _, _ = gemma4
    activation = moe.experts.activation
    if activation not in cpu_fused_moe._CPU_MOE_ACT_FN:
        pytest.skip(
            f"vLLM 0.19.1's CPU MoE backend cannot run {activation} (GELU or tanh "
            f"GELU): it runs only {sorted(a.value for a in cpu_fused_moe._CPU_MOE_ACT_FN)}"
        )
    hidden = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(4, NUM_EXPERTS, generator=torch.Generator().manual_seed(1))
    dtype = config.model_config.dtype
    assert run(moe, config, hidden.to(dtype), logits.to(dtype)).shape == (4, HIDDEN)
