"""vLLM's real MoE layers on CUDA, built outside an engine from the vLLM this process
imports (one variant per process: gpu_env), and what the tests measure on them.

Layer shapes and configs come from moe_layers (shared with the CPU tests). On CUDA a
layer also needs an NCCL world of one, vLLM's workspace manager, and its parameters
made on the GPU with the default dtype set to the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import moe_layers
import torch
from torch.autograd import DeviceType
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import (
    destroy_distributed_environment,
    destroy_model_parallel,
    init_distributed_environment,
    initialize_model_parallel,
)
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.v1.worker.workspace import init_workspace_manager

CUDA = torch.device("cuda")


@contextmanager
def distributed(workdir: Path) -> Iterator[None]:
    """A one-process NCCL group (tensor and pipeline parallel size 1) and vLLM's
    workspace manager on the GPU."""
    torch.cuda.set_device(0)
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="nccl",
            distributed_init_method=f"file://{workdir / 'dist-init'}",
        )
        initialize_model_parallel(1, 1)
    init_workspace_manager(CUDA)
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


def construct(make: Callable[[], torch.nn.Module], config: VllmConfig) -> torch.nn.Module:
    """make() on the GPU in the config's dtype, nothing loaded (vLLM picks the layer's
    kernels here)."""
    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype), CUDA:
        return make()


def build(
    make: Callable[[], torch.nn.Module],
    config: VllmConfig,
    load: Callable[[torch.nn.Module], dict[str, torch.Tensor]],
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """make() on the GPU in the config's dtype, its weights set by load() and then
    processed as the engine does; also float64 CPU copies of the weights load() set."""
    layer = construct(make, config)
    weights = {name: w.cpu() for name, w in load(layer).items()}
    process_weights_after_loading(layer, config.model_config, CUDA)
    return layer, weights


def random_weights(seed: int) -> Callable[[torch.nn.Module], dict[str, torch.Tensor]]:
    """A loader for build(): every parameter seeded random, as the CPU tests load them."""
    return lambda layer: moe_layers.load_random_weights(layer, seed)


def backend(experts: torch.nn.Module) -> str:
    """The unquantized MoE backend vLLM picked for a FusedMoE layer."""
    return experts.quant_method.unquantized_backend.value


TRITON = UnquantizedMoeBackend.TRITON.value


def run(config: VllmConfig, fn: Callable, *args) -> torch.Tensor:
    """fn(*args) (a layer, or a functional_call of one) as one eager inference forward in
    the config's forward context, finished on the GPU."""
    with set_forward_context(None, config), torch.inference_mode():
        out = fn(*args)
    torch.cuda.synchronize()
    return out


# --- precision ----------------------------------------------------------------
# Unit roundoff u of what each dtype's MoE kernels compute with. bfloat16: operands are
# bf16 already (exact in the float64 reference); every stored intermediate is rounded to
# nearest with 8 significant bits, u = 2^-9. float32: on Hopper, Triton's tl.dot runs
# float32 operands as TF32, 10 explicit mantissa bits; rounded or truncated, each operand
# is off by at most u = 2^-10 relative.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float32: 2.0**-10}
FP32_ACCUMULATION = 2.0**-24


def tolerance(dtype: torch.dtype, reduction: int) -> float:
    """Bound on the relative RMS error of a MoE layer's output against float64.

    Per GEMM the operands' rounding costs at most 2u relative per product; the fp32
    accumulation of `reduction` products adds at most reduction * 2^-24. On the random,
    zero-mean data of these tests the products' errors are independent, so relative to
    the sum (itself a sum of `reduction` random terms) they do not grow with the
    reduction size. Two GEMMs in a row, the activation passing on about its input's
    relative error, and one rounding per stored intermediate (four) stay under 8u.
    """
    u = UNIT_ROUNDOFF[dtype]
    return 8 * u + 2 * reduction * FP32_ACCUMULATION


def relative_rms_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.double().cpu(), reference.double().cpu()
    return float((out - reference).norm() / reference.norm())


# --- what the profiler sees ---------------------------------------------------
# aten's GEMM ops: cuBLAS (or cuBLASLt) kernels launched inside them belong to them.
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"}


@dataclass(frozen=True)
class GemmLaunch:
    op: str
    shapes: tuple[tuple[int, ...], ...]  # the op's input shapes
    kernels: tuple[str, ...]  # the CUDA kernels it launched


@dataclass(frozen=True)
class Profile:
    kernels: list[str]  # every CUDA kernel of the call, in order (no memcpy/memset)
    gemms: list[GemmLaunch]  # every aten GEMM op of the call

    def gemms_shaped(self, *shapes: tuple[int, ...]) -> list[GemmLaunch]:
        return [g for g in self.gemms if g.shapes[: len(shapes)] == shapes]

    def summary(self) -> dict:
        return {
            "cuda_kernels": len(self.kernels),
            "gemm_ops": len(self.gemms),
            "gemm_kernels": sum(len(g.kernels) for g in self.gemms),
            "kernels": self.kernels,
            "gemms": [{"op": g.op, "shapes": g.shapes, "kernels": g.kernels} for g in self.gemms],
        }


def profile(fn: Callable[[], object]) -> Profile:
    """The CUDA kernels of one call of fn, and which aten GEMM op launched which."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [
        e.name
        for e in sorted(events, key=lambda e: e.time_range.start)
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    gemms = [
        GemmLaunch(e.name, tuple(tuple(s) for s in e.input_shapes), tuple(k.name for k in e.kernels))
        for e in events
        if e.device_type == DeviceType.CPU and e.name in GEMM_OPS
    ]
    return Profile(kernels, gemms)


# --- CUDA graphs --------------------------------------------------------------


def capture(
    layer: torch.nn.Module, config: VllmConfig, *static_inputs: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """The layer's forward on static_inputs captured in a CUDA graph (after warm-up
    forwards on a side stream, which compile and tune the Triton kernels), and the
    graph's output tensor, refreshed by each replay."""
    with set_forward_context(None, config), torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static_inputs)
    torch.cuda.synchronize()
    return graph, out
