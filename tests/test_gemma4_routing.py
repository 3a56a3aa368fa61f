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

import pytest
import torch
from moe_layers import HIDDEN, NUM_EXPERTS, TOP_K, build_gemma4_moe, gemma4_config, load_variant, vllm_config
from vllm.config import VllmConfig

pytest_plugins = ["moe_fixtures"]


@dataclass
class Gemma4:
    module: ModuleType
    config: VllmConfig
    expect_bug: bool


class RoutingProbe(torch.nn.Module):
    """Makes a Gemma4MoE's routing the forward, so functional_call can drive it."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states, router_logits):
        return self.moe.experts.router.select_experts(hidden_states, router_logits)


@pytest.fixture(scope="module")
def gemma4(variant, moe_workdir, vllm_distributed) -> Gemma4:
    """The variant's gemma4 module, with one VllmConfig for all its layers."""
    config = vllm_config(gemma4_config(), moe_workdir, torch.float32)
    return Gemma4(load_variant(variant.name, "gemma4", moe_workdir), config, variant.expect_bug)


def build(gemma4: Gemma4, top_k: int = TOP_K, seed: int = 0) -> torch.nn.Module:
    """A Gemma4MoE whose per_expert_scale was loaded in place with values in [0.5, 1.5)."""
    moe = build_gemma4_moe(gemma4.module, gemma4.config, gemma4_config(top_k))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.per_expert_scale.copy_(0.5 + torch.rand(NUM_EXPERTS, generator=generator))
    return moe


def other_scale(seed: int) -> torch.Tensor:
    """Per-expert scales in [2, 3): never equal to the ones build() loads."""
    return 2 + torch.rand(NUM_EXPERTS, generator=torch.Generator().manual_seed(seed))


def random_inputs(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    logits = 3 * torch.randn(tokens, NUM_EXPERTS, generator=generator)
    return hidden, logits


def dense(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routing as a [tokens, experts] float64 matrix, zero for experts not chosen."""
    out = torch.zeros(ids.shape[0], NUM_EXPERTS, dtype=torch.float64)
    return out.scatter(1, ids.long(), weights.detach().double())


def reference_routing(logits: torch.Tensor, top_k: int, scale: torch.Tensor) -> torch.Tensor:
    """Gemma4's rule in float64: softmax over all experts, top-k, renormalise, times scale."""
    probs = torch.softmax(logits.double(), dim=-1)
    top, ids = probs.topk(top_k, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True) * scale.detach().double()[ids]
    return torch.zeros_like(probs).scatter(1, ids, weights)


def route(moe: torch.nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return dense(*moe.experts.router.select_experts(hidden, logits))


def assert_routing(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_functional_call_substitutes_per_expert_scale(gemma4):
    moe = build(gemma4)
    own = moe.per_expert_scale
    own_values = own.detach().clone()
    substitute = other_scale(seed=1)
    hidden, logits = random_inputs(tokens=16, seed=2)

    got = dense(
        *torch.func.functional_call(
            RoutingProbe(moe), {"moe.per_expert_scale": substitute}, (hidden, logits)
        )
    )

    # pristine: the closure still scales by the module's own tensor
    used = own_values if gemma4.expect_bug else substitute
    assert_routing(got, reference_routing(logits, TOP_K, used))
    # afterwards the module has its own Parameter back, and the routing uses it
    assert moe.per_expert_scale is own
    assert torch.equal(own.detach(), own_values)
    assert_routing(route(moe, hidden, logits), reference_routing(logits, TOP_K, own_values))


def test_replaced_parameter_reaches_routing(gemma4):
    moe = build(gemma4)
    old_values = moe.per_expert_scale.detach().clone()
    # what a loader or a quantization step does: a new Parameter object
    moe.per_expert_scale = torch.nn.Parameter(other_scale(seed=3), requires_grad=False)
    hidden, logits = random_inputs(tokens=16, seed=4)

    used = old_values if gemma4.expect_bug else moe.per_expert_scale
    assert_routing(route(moe, hidden, logits), reference_routing(logits, TOP_K, used))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_routing_matches_reference(gemma4, top_k, tokens):
    # The routing rule itself is the same in both; only where the scale is read differs.
    moe = build(gemma4, top_k, seed=top_k)
    hidden, logits = random_inputs(tokens, seed=100 * top_k + tokens)
    expected = reference_routing(logits, top_k, moe.per_expert_scale)
    assert_routing(route(moe, hidden, logits), expected)
