"""The FLOP counter's rule for custom ops without a formula (flops.py), on real
custom ops registered here: one that can touch no data of the layer passes and
counts nothing; one that can is named, whatever it does inside."""

from __future__ import annotations

import gc

import pytest
import torch
from flops import count_flops

LIB = torch.library.Library("flop_rule_test", "DEF")  # noqa: TOR901 (the ops live as long as the module)
LIB.define("release_handle(int handle) -> ()")
LIB.define("hidden_gemm(Tensor x, Tensor w) -> Tensor")
LIB.define("by_id(int layer_id) -> ()")
LIB.define("by_name(str layer_name) -> ()")
LIB.impl("release_handle", lambda handle: None, "CompositeExplicitAutograd")
LIB.impl("hidden_gemm", lambda x, w: x @ w.T, "CompositeExplicitAutograd")
LIB.impl("by_id", lambda layer_id: None, "CompositeExplicitAutograd")
LIB.impl("by_name", lambda layer_name: None, "CompositeExplicitAutograd")
OPS = torch.ops.flop_rule_test


@pytest.fixture
def layer() -> torch.nn.Linear:
    return torch.nn.Linear(16, 8, bias=False)


def test_op_that_takes_only_a_handle_passes_and_counts_nothing(layer):
    x = torch.randn(4, 16)

    def forward():
        OPS.release_handle(12345)
        return layer(x)

    flops = count_flops(layer, forward)
    assert flops.custom_op_calls["flop_rule_test::release_handle"] == 1
    assert flops.total == 2 * 4 * 16 * 8  # the aten GEMM of the linear layer only


def test_op_that_hides_a_gemm_is_named(layer):
    x = torch.randn(4, 16)
    assert torch.equal(OPS.hidden_gemm(x, layer.weight), x @ layer.weight.T)
    with pytest.raises(AssertionError, match=r"flop_rule_test::hidden_gemm \(takes or returns a tensor\)"):
        count_flops(layer, lambda: OPS.hidden_gemm(x, layer.weight))


def test_op_that_looks_the_layer_up_by_id_is_named(layer):
    with pytest.raises(AssertionError, match=r"flop_rule_test::by_id \(takes \d+, which identifies"):
        count_flops(layer, lambda: OPS.by_id(id(layer)))
    # Or by the address of one of its weights.
    with pytest.raises(AssertionError, match=r"flop_rule_test::by_id"):
        count_flops(layer, lambda: OPS.by_id(layer.weight.data_ptr() + 4))


def test_op_that_takes_a_name_is_named(layer):
    with pytest.raises(AssertionError, match=r"flop_rule_test::by_name \(takes the string 'layer'"):
        count_flops(layer, lambda: OPS.by_name("layer"))


def test_vllm_onednn_handle_freed_mid_forward_passes():
    """vLLM's own ops, where its kernel library has oneDNN: a GEMM through a
    handle counts by its formula; freeing a handle mid-forward counts nothing."""
    from vllm import _custom_ops as ops

    if not ops._supports_onednn:
        pytest.skip("this vLLM kernel library has no oneDNN GEMM")
    weight = torch.randn(8, 16)
    handler, spare = ops.create_onednn_mm(weight.T, 16), ops.create_onednn_mm(weight.T, 16)
    x = torch.randn(4, 16)

    def forward():
        nonlocal spare
        out = ops.onednn_mm(handler, x, None)
        spare = None  # the handle is released here, by garbage collection
        gc.collect()
        return out

    flops = count_flops(torch.nn.Module(), forward)
    assert flops.custom_op_calls["_C::onednn_mm"] == 1
    assert flops.custom_op_calls["_C::release_dnnl_matmul_handler"] == 1
    assert flops.total == 2 * 4 * 16 * 8
