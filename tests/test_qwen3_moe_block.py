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
from typing import TYPE_CHECKING

import pytest
import torch
from flops import count_flops
from moe_fixtures import Kernel, fixed_variant
from moe_layers import (
    HIDDEN,
    NUM_EXPERTS,
    SHARED_INTERMEDIATE,
    TOP_K,
    build_qwen3_block,
    counting_calls,
    load_pristine,
    load_variant,
    path_op,
    qwen3_config,
    run,
    vllm_config,
)
from references import qwen3_block

if TYPE_CHECKING:
    from vllm.config import VllmConfig

pytest_plugins = ["moe_fixtures"]

# Against the float64 dense reference. bfloat16 rounds every activation to 8
# significant bits: the largest error measured (torch path, AVX2, 5 x 64
# tokens) was 0.021 on outputs of up to 3.3.
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 4e-2}}
# Sampled tokens are kept only if their top-k experts lead the next one by
# this much in exact arithmetic: far above bfloat16's rounding of the router
# logits, so every dtype picks the experts the reference picks.
ROUTING_MARGIN = 0.1


@dataclass
class Block:
    layer: torch.nn.Module
    config: VllmConfig
    weights: dict[str, torch.Tensor]  # float64, as loaded
    shared: bool
    kernel: Kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A copy: SGL's fused_experts_cpu writes its result into its input.
        return run(self.layer, self.config, x.clone())


@pytest.fixture(scope="module")
def qwen3(variant, moe_workdir, vllm_distributed) -> ModuleType:
    return load_variant(variant.name, "qwen3_moe", moe_workdir)


def build(module: ModuleType, shared: bool, workdir: Path, kernel: Kernel, seed: int = 0) -> Block:
    """A block with seeded weights and its own VllmConfig, on the kernel's path."""
    hf_config = qwen3_config(
        SHARED_INTERMEDIATE if shared else 0, moe_intermediate_size=kernel.case.moe_intermediate
    )
    config = vllm_config(hf_config, workdir, kernel.dtype)
    layer, weights = build_qwen3_block(module, config, seed)
    assert layer.experts.is_internal_router == shared
    kernel.check(layer.experts)
    return Block(layer, config, weights, shared, kernel)


def tokens(block: Block, count: int, seed: int) -> torch.Tensor:
    """`count` random tokens in the block's dtype whose top-k experts are clear."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    while sum(len(x) for x in kept) < count:
        x = torch.randn(4 * count, HIDDEN, generator=generator).to(block.kernel.dtype)
        logits = (x.double() @ block.weights["gate.weight"].T).sort(dim=-1, descending=True).values
        kept.append(x[logits[:, TOP_K - 1] - logits[:, TOP_K] > ROUTING_MARGIN])
    return torch.cat(kept)[:count]


def assert_matches_reference(block: Block, x: torch.Tensor, out: torch.Tensor) -> None:
    assert out.dtype == block.kernel.dtype
    reference = qwen3_block(x, block.weights, TOP_K, block.shared)
    torch.testing.assert_close(out.double(), reference, **TOLERANCE[out.dtype])


def expected_flops(block: Block, count: int, router_gemms: int) -> int:
    """GEMM FLOPs of one forward of `count` tokens, from the layer shapes."""
    intermediate = block.kernel.case.moe_intermediate
    router = 2 * count * HIDDEN * NUM_EXPERTS
    routed = 2 * count * TOP_K * 3 * HIDDEN * intermediate
    shared_mlp = 2 * count * (3 * HIDDEN * SHARED_INTERMEDIATE + HIDDEN) if block.shared else 0
    return router_gemms * router + routed + shared_mlp


@pytest.mark.parametrize("count", [1, 16])
def test_shared_experts_gate_runs_once(qwen3, variant, kernel, moe_workdir, count):
    block = build(qwen3, shared=True, workdir=moe_workdir, kernel=kernel)
    x = tokens(block, count, seed=count)

    with counting_calls(block.layer.gate) as gate_calls:
        out = block.forward(x)

    assert len(gate_calls) == (2 if variant.expect_bug else 1)
    assert_matches_reference(block, x, out)


def test_without_shared_experts_gate_runs_once(qwen3, kernel, moe_workdir):
    """The bug needs shared experts: without them every variant runs the gate once."""
    block = build(qwen3, shared=False, workdir=moe_workdir, kernel=kernel, seed=1)
    x = tokens(block, 16, seed=2)

    with counting_calls(block.layer.gate) as gate_calls:
        out = block.forward(x)

    assert len(gate_calls) == 1
    assert_matches_reference(block, x, out)


def test_without_shared_experts_the_fix_changes_nothing(moe_workdir, vllm_distributed, kernel):
    """What carries the fix, against upstream's file loaded on its own: the same bits."""
    pristine = build(load_pristine("qwen3_moe", moe_workdir), False, moe_workdir, kernel, seed=1)
    fixed = build(load_variant(fixed_variant(), "qwen3_moe", moe_workdir), False, moe_workdir, kernel, seed=1)
    assert fixed.layer.__class__.__module__ != pristine.layer.__class__.__module__
    x = tokens(fixed, 16, seed=2)
    assert torch.equal(fixed.forward(x), pristine.forward(x))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_forward_flops(qwen3, variant, kernel, moe_workdir, shared):
    block = build(qwen3, shared, moe_workdir, kernel)
    count = 16
    router_gemms = 2 if variant.expect_bug and shared else 1
    x = tokens(block, count, seed=3)
    flops = count_flops(block.layer, lambda: block.forward(x))
    # The routed experts ran in the one op of the path vLLM picked.
    assert flops.custom_op_calls[path_op(kernel.selected)] == 1
    assert flops.total == expected_flops(block, count, router_gemms)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_build_saves_exactly_one_router_gemm(moe_workdir, vllm_distributed, kernel, shared):
    pristine = build(load_pristine("qwen3_moe", moe_workdir), shared, moe_workdir, kernel)
    patched = build(load_variant(fixed_variant(), "qwen3_moe", moe_workdir), shared, moe_workdir, kernel)
    x = tokens(patched, 16, seed=4)
    saved = (
        count_flops(pristine.layer, lambda: pristine.forward(x)).total
        - count_flops(patched.layer, lambda: patched.forward(x)).total
    )
    assert saved == (2 * len(x) * HIDDEN * NUM_EXPERTS if shared else 0)
