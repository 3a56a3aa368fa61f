"""Gemma4MoE's routing on the real FusedMoE, pristine 0.19.1 against the build.

The bug (vllm#42239, fixed upstream by #42250): the custom routing function
closed over the per_expert_scale Parameter taken in __init__, so neither a
tensor substituted by torch.func.functional_call nor a Parameter replaced
later reached the routing. The routing is driven through
layer.experts.router.select_experts, the router Gemma4MoE.forward uses; that
forward itself stops on 0.19.1's CPU backend, which has no GELU experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch
from moe_fixtures import Kernel
from moe_layers import (
    NUM_EXPERTS,
    TOP_K,
    build_gemma4_moe,
    gemma4_config,
    gemma4_inputs,
    load_variant,
    vllm_config,
)
from references import gemma4_routing

if TYPE_CHECKING:
    from vllm.config import VllmConfig

pytest_plugins = ["moe_fixtures"]

# Routing weights against the float64 reference: float32 rounding, or
# bfloat16's softmax and scale (8 significant bits; measured: at most 0.003
# absolute, 0.8 % relative). The two scales a bug test tells apart differ by
# over 30 %.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-3}}


@dataclass
class Gemma4:
    module: ModuleType
    config: VllmConfig
    expect_bug: bool
    kernel: Kernel

    @property
    def dtype(self) -> torch.dtype:
        return self.kernel.dtype


class RoutingForward(torch.nn.Module):
    """Makes a Gemma4MoE's routing the forward, so functional_call can drive it."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states, router_logits):
        return self.moe.experts.router.select_experts(hidden_states, router_logits)


@pytest.fixture(scope="module")
def gemma4(variant, kernel, moe_workdir, vllm_distributed) -> Gemma4:
    """The variant's gemma4 module, with one VllmConfig for all its layers."""
    hf_config = gemma4_config(moe_intermediate_size=kernel.case.moe_intermediate)
    config = vllm_config(hf_config, moe_workdir, kernel.dtype)
    module = load_variant(variant.name, "gemma4", moe_workdir)
    return Gemma4(module, config, variant.expect_bug, kernel)


def build(gemma4: Gemma4, top_k: int = TOP_K, seed: int = 0) -> torch.nn.Module:
    """A Gemma4MoE on the kernel's path whose per_expert_scale was loaded in
    place with values in [0.5, 1.5)."""
    hf_config = gemma4_config(top_k, moe_intermediate_size=gemma4.kernel.case.moe_intermediate)
    moe, _ = build_gemma4_moe(gemma4.module, gemma4.config, hf_config, seed)
    gemma4.kernel.check(moe.experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.per_expert_scale.copy_(0.5 + torch.rand(NUM_EXPERTS, generator=generator))
    return moe


def other_scale(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-expert scales in [2, 3): never equal to the ones build() loads."""
    return (2 + torch.rand(NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))).to(dtype)


def dense(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routing as a [tokens, experts] float64 matrix, zero for experts not chosen."""
    out = torch.zeros(ids.shape[0], NUM_EXPERTS, dtype=torch.float64)
    return out.scatter(1, ids.long(), weights.detach().double())


def route(moe: torch.nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return dense(*moe.experts.router.select_experts(hidden, logits))


def assert_routing(gemma4: Gemma4, got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, **TOLERANCE[gemma4.dtype])


def test_functional_call_substitutes_per_expert_scale(gemma4):
    moe = build(gemma4)
    own = moe.per_expert_scale
    own_values = own.detach().clone()
    substitute = other_scale(seed=1, dtype=gemma4.dtype)
    hidden, logits = gemma4_inputs(tokens=16, seed=2, dtype=gemma4.dtype)

    got = dense(
        *torch.func.functional_call(
            RoutingForward(moe), {"moe.per_expert_scale": substitute}, (hidden, logits)
        )
    )

    # pristine: the closure still scales by the module's own tensor
    used = own_values if gemma4.expect_bug else substitute
    assert_routing(gemma4, got, gemma4_routing(logits, TOP_K, used))
    # afterwards the module has its own Parameter back, and the routing uses it
    assert moe.per_expert_scale is own
    assert torch.equal(own.detach(), own_values)
    assert_routing(gemma4, route(moe, hidden, logits), gemma4_routing(logits, TOP_K, own_values))


def test_replaced_parameter_reaches_routing(gemma4):
    moe = build(gemma4)
    old_values = moe.per_expert_scale.detach().clone()
    # what a loader or a quantization step does: a new Parameter object
    moe.per_expert_scale = torch.nn.Parameter(other_scale(seed=3, dtype=gemma4.dtype), requires_grad=False)
    hidden, logits = gemma4_inputs(tokens=16, seed=4, dtype=gemma4.dtype)

    used = old_values if gemma4.expect_bug else moe.per_expert_scale
    assert_routing(gemma4, route(moe, hidden, logits), gemma4_routing(logits, TOP_K, used))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_routing_matches_reference(gemma4, top_k, tokens):
    # The routing rule itself is the same in both; only where the scale is read differs.
    moe = build(gemma4, top_k, seed=top_k)
    hidden, logits = gemma4_inputs(tokens, seed=100 * top_k + tokens, dtype=gemma4.dtype)
    expected = gemma4_routing(logits, top_k, moe.per_expert_scale)
    assert_routing(gemma4, route(moe, hidden, logits), expected)
