"""Qwen3MoeSparseMoeBlock on the real SharedFusedMoE, pristine 0.19.1 against the build.

The bug (found in vllm#35326, fixed upstream by #40664): with shared experts
the SharedFusedMoE runs the router gate itself (is_internal_router), yet the
block's forward ran self.gate first as well, so every forward did the router
GEMM twice and dropped the first result. Without shared experts the gate ran
once already and the block must behave exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from moe_layers import (
    HIDDEN,
    MOE_INTERMEDIATE,
    NUM_EXPERTS,
    SHARED_INTERMEDIATE,
    TOP_K,
    build_qwen3_block,
    count_flops,
    counting_calls,
    load_patched,
    load_pristine,
    load_variant,
    qwen3_config,
    run,
    vllm_config,
)
from vllm.config import VllmConfig

pytest_plugins = ["moe_fixtures"]


@dataclass
class Block:
    layer: torch.nn.Module
    config: VllmConfig
    weights: dict[str, torch.Tensor]  # float64, as loaded
    shared: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.layer, self.config, x)


@pytest.fixture(scope="module")
def qwen3(variant, moe_workdir, vllm_distributed) -> ModuleType:
    return load_variant(variant.name, "qwen3_moe", moe_workdir)


def build(module: ModuleType, shared: bool, workdir: Path, seed: int = 0) -> Block:
    """A block with seeded weights and its own VllmConfig."""
    hf_config = qwen3_config(SHARED_INTERMEDIATE if shared else 0)
    config = vllm_config(hf_config, workdir, torch.float32)
    layer, weights = build_qwen3_block(module, config, seed)
    assert layer.experts.is_internal_router == shared
    return Block(layer, config, weights, shared)


def tokens(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The block in float64, dense over all experts.

    Routed: softmax over the gate logits, top-k, renormalised (norm_topk_prob),
    each expert down(silu(gate) * up). Shared: the same MLP, times
    sigmoid(shared_expert_gate).
    """
    w = block.weights
    x = x.double()
    probs = torch.softmax(x @ w["gate.weight"].T, dim=-1)
    top, ids = probs.topk(TOP_K, dim=-1)
    routing = torch.zeros_like(probs).scatter(1, ids, top / top.sum(dim=-1, keepdim=True))
    hidden = swiglu(torch.einsum("th,eoh->teo", x, w["experts.w13_weight"]))
    experts = torch.einsum("tei,ehi->teh", hidden, w["experts.w2_weight"])
    out = torch.einsum("te,teh->th", routing, experts)
    if block.shared:
        shared = swiglu(x @ w["shared_expert.gate_up_proj.weight"].T)
        shared = shared @ w["shared_expert.down_proj.weight"].T
        out += torch.sigmoid(x @ w["shared_expert_gate.weight"].T) * shared
    return out


def expected_flops(count: int, shared: bool, router_gemms: int) -> int:
    """GEMM FLOPs of one forward of `count` tokens, from the layer shapes."""
    router = 2 * count * HIDDEN * NUM_EXPERTS
    routed = 2 * count * TOP_K * 3 * HIDDEN * MOE_INTERMEDIATE
    shared_mlp = 2 * count * (3 * HIDDEN * SHARED_INTERMEDIATE + HIDDEN) if shared else 0
    return router_gemms * router + routed + shared_mlp


@pytest.mark.parametrize("count", [1, 16])
def test_shared_experts_gate_runs_once(qwen3, variant, moe_workdir, count):
    block = build(qwen3, shared=True, workdir=moe_workdir)
    x = tokens(count, seed=count)

    with counting_calls(block.layer.gate) as gate_calls:
        out = block.forward(x)

    assert len(gate_calls) == (2 if variant.expect_bug else 1)
    torch.testing.assert_close(out.double(), reference_block(block, x), rtol=1e-4, atol=1e-5)


def test_without_shared_experts_output_is_pristine(qwen3, moe_workdir):
    block = build(qwen3, shared=False, workdir=moe_workdir, seed=1)
    pristine = build(load_pristine("qwen3_moe", moe_workdir), False, moe_workdir, seed=1)
    x = tokens(16, seed=2)

    with counting_calls(block.layer.gate) as gate_calls:
        out = block.forward(x)

    assert len(gate_calls) == 1
    assert torch.equal(out, pristine.forward(x))
    torch.testing.assert_close(out.double(), reference_block(block, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_forward_flops(qwen3, variant, moe_workdir, shared):
    block = build(qwen3, shared, moe_workdir)
    count = 16
    router_gemms = 2 if variant.expect_bug and shared else 1
    flops = count_flops(lambda: block.forward(tokens(count, seed=3)))
    assert flops == expected_flops(count, shared, router_gemms)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_build_saves_exactly_one_router_gemm(moe_workdir, vllm_distributed, shared):
    x = tokens(16, seed=4)
    pristine = build(load_pristine("qwen3_moe", moe_workdir), shared, moe_workdir)
    patched = build(load_patched("qwen3_moe"), shared, moe_workdir)
    saved = count_flops(lambda: pristine.forward(x)) - count_flops(lambda: patched.forward(x))
    assert saved == (2 * len(x) * HIDDEN * NUM_EXPERTS if shared else 0)
