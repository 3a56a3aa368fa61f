"""GEMM FLOPs of a layer's forward, vLLM's CPU custom ops included.

vLLM's CPU backend runs its GEMMs in custom ops that torch's flop counter has
no formula for and would count as zero. The formulas below give it the
multiply-add count of each from the operand shapes. Any other custom op fails
the count, naming the op, unless it cannot compute on the layer's data:

- it takes and returns no tensor (nested lists, tuples and dicts included):
  activations can neither reach it nor leave it;
- it takes no string: vLLM looks layers up by name (the forward context), so
  a string may hand the op any layer's tensors;
- no integer it takes is the id() of a module or tensor of the layer, or an
  address inside one of the layer's tensors: vLLM's CPU MoE looks its layer
  up by id() (cpu_fused_moe._CPU_MOE_LAYER_CACHE).

Such an op, e.g. _C::release_dnnl_matmul_handler freeing a oneDNN handle
when garbage collection runs, is GEMM-free whatever it is called and
whenever it runs. Ops that take tensors need a formula, except the few
elementwise kernels in ELEMENTWISE_OPS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# vLLM's elementwise CPU kernels: each output row comes from the same row of
# the input (and, for the norms, a weight vector); nothing is contracted.
ELEMENTWISE_OPS = {"_C::silu_and_mul", "_C::rms_norm", "_C::fused_add_rms_norm"}


def _onednn_mm_flops(c, a, bias, handler, out_shape=None) -> int:
    # c[M, N] = a[M, K] @ W[K, N]: M * K * N multiply-adds
    return 2 * torch.Size(a).numel() * c[-1]


def _experts_flops(op: str, topk_ids, w13, w2) -> int:
    """gate_up [2I, H] and down [H, I] per (token, chosen expert), from the weights'
    per-expert element counts, which packing for a kernel does not change."""
    w13_each, w2_each = torch.Size(w13[1:]).numel(), torch.Size(w2[1:]).numel()
    if w13_each != 2 * w2_each:
        raise ValueError(f"{op}: unexpected expert weight shapes w13={w13} w2={w2}")
    return 2 * torch.Size(topk_ids).numel() * (w13_each + w2_each)


def _cpu_fused_moe_flops(
    output, x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, *flags, out_shape=None
) -> int:
    return _experts_flops("_C::cpu_fused_moe", topk_ids, w13, w2)


def _fused_experts_cpu_flops(x, w13, w2, topk_weights, topk_ids, *flags, out_shape=None) -> int:
    return _experts_flops("_C::fused_experts_cpu", topk_ids, w13, w2)


def _cpu_fused_moe_torch_flops(layer_id, output, x, topk_weights, topk_ids, *flags, out_shape=None) -> int:
    # The op takes no weights: it looks its layer up by id, and so do we.
    from vllm.model_executor.layers.fused_moe import cpu_fused_moe

    layer = cpu_fused_moe._CPU_MOE_LAYER_CACHE[layer_id]()
    hidden, intermediate = layer.hidden_size, layer.intermediate_size_per_partition
    return 2 * torch.Size(topk_ids).numel() * 3 * hidden * intermediate


def cpu_flop_formulas() -> dict:
    """The formulas for the GEMM ops the loaded vLLM kernel library has."""
    formulas = {}
    for namespace, name, formula in (
        ("_C", "onednn_mm", _onednn_mm_flops),
        ("_C", "cpu_fused_moe", _cpu_fused_moe_flops),
        ("_C", "fused_experts_cpu", _fused_experts_cpu_flops),
        ("vllm", "cpu_fused_moe_torch", _cpu_fused_moe_torch_flops),
    ):
        if hasattr(getattr(torch.ops, namespace), name):
            formulas[getattr(getattr(torch.ops, namespace), name)] = formula
    return formulas


def _leaves(value) -> Iterator[object]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _layer_refs(layer: torch.nn.Module) -> tuple[set[int], list[tuple[int, int]]]:
    """The id()s of the layer's modules and tensors, and its tensors' address ranges."""
    tensors = [*layer.parameters(), *layer.buffers()]
    ids = {id(obj) for obj in [*layer.modules(), *tensors]}
    spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in tensors]
    return ids, spans


def _reach(values, ids: set[int], spans: list[tuple[int, int]]) -> str:
    """How an op's arguments or results could reach the layer's data ('' if they cannot)."""
    for value in _leaves(values):
        if isinstance(value, torch.Tensor):
            return "takes or returns a tensor"
        if isinstance(value, str):
            return f"takes the string {value!r}, which may name a layer"
        if isinstance(value, int) and not isinstance(value, bool):
            if value in ids or any(start <= value < end for start, end in spans):
                return f"takes {value}, which identifies the layer's data"
    return ""


class _CustomOpCalls(TorchDispatchMode):
    """Counts the calls of every op outside aten and prims, by schema name, and
    notes how those without a formula could reach the layer's data."""

    def __init__(self, layer: torch.nn.Module, known: set[str]):
        super().__init__()
        self.refs = _layer_refs(layer)
        self.known = known
        self.calls: Counter[str] = Counter()
        self.opaque: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name
        if func.namespace not in ("aten", "prims"):
            self.calls[name] += 1
            if name not in self.known and name not in ELEMENTWISE_OPS:
                if reach := _reach([args, kwargs, result], *self.refs):
                    self.opaque.setdefault(name, reach)
        return result


@dataclass(frozen=True)
class Flops:
    total: int
    custom_op_calls: Counter[str]


def count_flops(layer: torch.nn.Module, fn: Callable[[], object]) -> Flops:
    """GEMM FLOPs of one call of fn, a forward of layer."""
    formulas = cpu_flop_formulas()
    known = {packet._qualified_op_name for packet in formulas}
    with (
        FlopCounterMode(display=False, custom_mapping=formulas) as counter,
        _CustomOpCalls(layer, known) as custom,
    ):
        fn()
    if custom.opaque:
        named = "; ".join(f"{name} ({why})" for name, why in sorted(custom.opaque.items()))
        raise AssertionError(f"no FLOP formula for custom op(s) {named}: they would count as zero")
    return Flops(counter.get_total_flops(), custom.calls)
