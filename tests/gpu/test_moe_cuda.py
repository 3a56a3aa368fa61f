"""Both MoE bugs, and Gemma4's expert activation, on vLLM's real FusedMoE on CUDA (the
Triton fused-MoE path), in this process's variant: pristine 0.19.1 must show each bug,
the patched wheel and the plugin must not (the plugin runs tanh GELU too: it carries
every patch). Outputs are checked against the float64 references of
tests/references.py, in float32 (TF32 inside the Triton kernel on Hopper) and
bfloat16, eagerly and replayed from a CUDA graph.
"""

from __future__ import annotations

import gpu_env
import pytest

if reason := gpu_env.unavailable():
    pytest.skip(reason, allow_module_level=True)

import functools  # noqa: E402
import importlib  # noqa: E402
import itertools  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import cuda_layers  # noqa: E402
import moe_layers  # noqa: E402
import references  # noqa: E402
import torch  # noqa: E402
from cuda_layers import CUDA, UNIT_ROUNDOFF, relative_rms_error, run, tolerance  # noqa: E402
from moe_layers import HIDDEN, MOE_INTERMEDIATE, NUM_EXPERTS, SHARED_INTERMEDIATE, TOP_K  # noqa: E402
from series_helpers import GELU_FIX  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402

MODELS = "vllm.model_executor.models"
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
TOKENS = 64
EXPECT_BUG = gpu_env.expects_bugs()
# Gemma4's experts should use tanh GELU (its hidden_activation, gelu_pytorch_tanh);
# pristine 0.19.1 builds them with exact (erf) GELU; the patched wheel and the plugin
# (whose startup hook serves the fused-MoE modules too) with tanh GELU.
GEMMA4_ACTIVATION = "gelu_tanh" if gpu_env.has_fix(GELU_FIX) else "gelu"
# Tokens are kept only if their top-k experts lead the next one by this much in exact
# arithmetic: far above the rounding of router logits in either dtype, so the kernel
# picks the experts the reference picks.
ROUTING_MARGIN = 0.1

_prefixes = itertools.count()
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


def prefix() -> str:
    return f"model.layers.{next(_prefixes)}.mlp"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe-cuda")


@pytest.fixture(scope="module")
def cuda(workdir):
    with cuda_layers.distributed(workdir):
        yield


@pytest.fixture(scope="module")
def gemma4(cuda) -> ModuleType:
    return importlib.import_module(f"{MODELS}.gemma4")


@pytest.fixture(scope="module")
def qwen3(cuda) -> ModuleType:
    return importlib.import_module(f"{MODELS}.qwen3_moe")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Gemma4MoE ----------------------------------------------------------------


@dataclass
class Gemma4:
    layer: torch.nn.Module
    config: VllmConfig
    weights: dict[str, torch.Tensor]  # float64, as loaded
    dtype: torch.dtype

    @property
    def scale(self) -> torch.Tensor:
        return self.layer.per_expert_scale

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return run(self.config, self.layer, x, logits)

    def reference(self, x, logits, scale, activation=GEMMA4_ACTIVATION) -> torch.Tensor:
        return references.gemma4_moe(x.cpu(), logits.cpu(), self.weights, TOP_K, scale.cpu(), activation)


def build_gemma4(module: ModuleType, workdir: Path, dtype: torch.dtype, seed: int = 0, load=None) -> Gemma4:
    """A Gemma4MoE on the GPU whose per_expert_scale was loaded in place with values in
    [0.5, 1.5); other weights from `load` (seeded random by default)."""
    hf_config = moe_layers.gemma4_config()
    config = moe_layers.vllm_config(hf_config, workdir, dtype)
    layer, weights = cuda_layers.build(
        lambda: module.Gemma4MoE(hf_config, prefix=prefix()), config, load or cuda_layers.random_weights(seed)
    )
    assert cuda_layers.backend(layer.experts) == cuda_layers.TRITON
    with torch.no_grad():
        layer.per_expert_scale.copy_(0.5 + torch.rand(NUM_EXPERTS, generator=generator(seed)))
    return Gemma4(layer, config, weights, dtype)


def other_scale(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-expert scales in [2, 3): never equal to the ones build_gemma4 loads."""
    return (2 + torch.rand(NUM_EXPERTS, generator=generator(seed))).to(dtype).to(CUDA)


def gemma4_inputs(count: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states, and float32 router logits (as Gemma4Router returns them) that are the
    levels -2, -1.5, ..., 1.5 in random order per token: never tied, so top-k cannot
    choose differently from the reference."""
    gen = generator(seed)
    x = torch.randn(count, HIDDEN, generator=gen).to(dtype)
    order = torch.rand(count, NUM_EXPERTS, generator=gen).argsort(dim=-1)
    logits = (order - NUM_EXPERTS / 2) * 0.5
    return x.to(CUDA), logits.to(torch.float32).to(CUDA)


def assert_close_to(
    out: torch.Tensor, expected: torch.Tensor, other: torch.Tensor, dtype: torch.dtype, what: str
) -> float:
    """out is within the tolerance of `expected` and outside it of `other`: the test
    tells the two apart. Returns the error."""
    bound = tolerance(dtype, reduction=max(HIDDEN, MOE_INTERMEDIATE))
    error, error_other = relative_rms_error(out, expected), relative_rms_error(out, other)
    gpu_env.record(what, dtype=dtype, error=error, error_to_other=error_other, tolerance=bound)
    assert error <= bound, f"{what}: relative RMS error {error:.2e} > {bound:.2e}"
    assert error_other > bound, f"{what}: {error_other:.2e} from the other reference too"
    return error


@dtypes
def test_gemma4_forward_matches_float64(gemma4, workdir, dtype):
    moe = build_gemma4(gemma4, workdir, dtype)
    x, logits = gemma4_inputs(TOKENS, seed=1, dtype=dtype)

    out = moe.forward(x, logits)

    assert out.shape == x.shape and out.dtype == dtype
    bound = tolerance(dtype, reduction=max(HIDDEN, MOE_INTERMEDIATE))
    error = relative_rms_error(out, moe.reference(x, logits, moe.scale))
    gpu_env.record(
        "gemma4 forward",
        dtype=dtype,
        error=error,
        tolerance=bound,
        activation=str(moe.layer.experts.activation),
    )
    assert error <= bound


@dtypes
def test_gemma4_functional_call_reaches_routing(gemma4, workdir, dtype):
    """The routing runs inside torch.ops.vllm.moe_forward; a per_expert_scale substituted
    by functional_call must reach it there."""
    moe = build_gemma4(gemma4, workdir, dtype, seed=2)
    own = moe.scale
    own_values = own.detach().clone()
    substitute = other_scale(seed=3, dtype=dtype)
    x, logits = gemma4_inputs(TOKENS, seed=4, dtype=dtype)
    substituted = functools.partial(torch.func.functional_call, moe.layer, {"per_expert_scale": substitute})

    out = run(moe.config, substituted, (x, logits))

    with_substitute, with_own = moe.reference(x, logits, substitute), moe.reference(x, logits, own_values)
    if EXPECT_BUG:  # the closure still scales by the module's own Parameter
        assert_close_to(out, with_own, with_substitute, dtype, "gemma4 functional_call (pristine)")
    else:
        assert_close_to(out, with_substitute, with_own, dtype, "gemma4 functional_call")
    # afterwards the module has its own Parameter back, and the forward uses it
    assert moe.scale is own and torch.equal(own.detach(), own_values)
    assert_close_to(moe.forward(x, logits), with_own, with_substitute, dtype, "gemma4 after functional_call")


@dtypes
def test_gemma4_replaced_parameter_reaches_routing(gemma4, workdir, dtype):
    moe = build_gemma4(gemma4, workdir, dtype, seed=5)
    old_values = moe.scale.detach().clone()
    # what a loader or a quantization step does: a new Parameter object
    moe.layer.per_expert_scale = torch.nn.Parameter(other_scale(seed=6, dtype=dtype), requires_grad=False)
    x, logits = gemma4_inputs(TOKENS, seed=7, dtype=dtype)

    out = moe.forward(x, logits)

    with_new, with_old = moe.reference(x, logits, moe.scale), moe.reference(x, logits, old_values)
    if EXPECT_BUG:
        assert_close_to(out, with_old, with_new, dtype, "gemma4 replaced Parameter (pristine)")
    else:
        assert_close_to(out, with_new, with_old, dtype, "gemma4 replaced Parameter")


# Gate pre-activations where exact and tanh GELU differ most relative to their value:
# on [-3.4, -2.5] tanh GELU is 2.8 % to 21 % above exact GELU (elsewhere mostly < 0.1 %).
GELU_PROBE_GATE = (-3.4, -2.5)


def representable(low: float, high: float, shape, gen: torch.Generator) -> torch.Tensor:
    """Uniform values in [low, high] that bfloat16 (hence TF32 and float32) holds exactly."""
    values = low + (high - low) * torch.rand(shape, generator=gen)
    return values.to(torch.bfloat16).clamp(low, high).double()


def gelu_probe_weights(seed: int):
    """A loader for cuda_layers.build: one-hot tokens pick one column of each expert, so
    every gate pre-activation is a weight, exact in any dtype, in GELU_PROBE_GATE; up and
    down weights are positive, so no sum cancels and the relative difference of the
    two GELUs carries through to every output."""

    def load(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        gen = generator(seed)
        w13, w2 = layer.experts.w13_weight, layer.experts.w2_weight
        experts, rows, hidden = w13.shape
        gate = representable(*GELU_PROBE_GATE, (experts, rows // 2, hidden), gen)
        up = representable(0.5, 1.5, (experts, rows // 2, hidden), gen)
        down = representable(0.5, 1.5, tuple(w2.shape), gen) / w2.shape[-1]  # a power of two
        loaded = {"experts.w13_weight": torch.cat([gate, up], dim=1), "experts.w2_weight": down}
        with torch.no_grad():
            for name, values in loaded.items():
                layer.get_parameter(name).copy_(values)
        return loaded

    return load


@dtypes
def test_gemma4_experts_use_tanh_gelu(gemma4, workdir, dtype):
    """Patched and plugin: the experts compute tanh GELU (upstream #41574); pristine
    0.19.1 computes exact GELU."""
    moe = build_gemma4(gemma4, workdir, dtype, seed=8, load=gelu_probe_weights(seed=8))
    columns = torch.randperm(HIDDEN, generator=generator(9))[:32]
    x = torch.nn.functional.one_hot(columns, HIDDEN).to(dtype).to(CUDA)
    _, logits = gemma4_inputs(len(columns), seed=10, dtype=dtype)

    out = moe.forward(x, logits).double().cpu()

    tanh, exact = (moe.reference(x, logits, moe.scale, act) for act in ("gelu_tanh", "gelu"))
    # Every output is a positive combination of same-signed terms, rounded a few times on
    # the way (activation, weighted expert output, sum of the top-k): about 3u relative
    # (bf16 emulated on a CPU: 0.0065 = 3.3u); 8u to spare. The other GELU is >= 5 % off.
    bound = 8 * UNIT_ROUNDOFF[dtype]
    gap = float(((tanh - exact) / exact).abs().min())
    assert gap > 2 * bound, f"test design: the two GELUs differ by only {gap:.2e} here"
    errors = {
        act: float(((out - ref) / ref).abs().max()) for act, ref in (("gelu_tanh", tanh), ("gelu", exact))
    }
    gpu_env.record(
        "gemma4 activation",
        dtype=dtype,
        max_relative_error=errors,
        tolerance=bound,
        gap=gap,
        activation=str(moe.layer.experts.activation),
    )
    other = "gelu_tanh" if GEMMA4_ACTIVATION == "gelu" else "gelu"
    assert errors[GEMMA4_ACTIVATION] <= bound, errors
    assert errors[other] > bound, errors


# --- Qwen3MoeSparseMoeBlock -----------------------------------------------------


@dataclass
class Qwen3:
    layer: torch.nn.Module
    config: VllmConfig
    weights: dict[str, torch.Tensor]  # float64, as loaded
    dtype: torch.dtype
    shared: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run(self.config, self.layer, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return references.qwen3_block(x.cpu(), self.weights, TOP_K, self.shared)

    def tokens(self, count: int, seed: int) -> torch.Tensor:
        """`count` random tokens whose top-k experts are clear (ROUTING_MARGIN)."""
        gen, kept = generator(seed), []
        while sum(len(x) for x in kept) < count:
            x = torch.randn(4 * count, HIDDEN, generator=gen).to(self.dtype)
            logits = (x.double() @ self.weights["gate.weight"].T).sort(dim=-1, descending=True).values
            kept.append(x[logits[:, TOP_K - 1] - logits[:, TOP_K] > ROUTING_MARGIN])
        return torch.cat(kept)[:count].to(CUDA)


def build_qwen3(module: ModuleType, workdir: Path, dtype: torch.dtype, shared: bool, seed: int = 0) -> Qwen3:
    hf_config = moe_layers.qwen3_config(SHARED_INTERMEDIATE if shared else 0)
    config = moe_layers.vllm_config(hf_config, workdir, dtype)
    layer, weights = cuda_layers.build(
        lambda: module.Qwen3MoeSparseMoeBlock(config, prefix=prefix()),
        config,
        cuda_layers.random_weights(seed),
    )
    assert layer.experts.is_internal_router == shared
    assert cuda_layers.backend(layer.experts) == cuda_layers.TRITON
    return Qwen3(layer, config, weights, dtype, shared)


def qwen3_tolerance(dtype: torch.dtype) -> float:
    return tolerance(dtype, reduction=max(HIDDEN, MOE_INTERMEDIATE, SHARED_INTERMEDIATE))


shared_or_not = pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])


@dtypes
@shared_or_not
def test_qwen3_gate_runs_once(qwen3, workdir, dtype, shared):
    block = build_qwen3(qwen3, workdir, dtype, shared)
    x = block.tokens(TOKENS, seed=1)

    with moe_layers.counting_calls(block.layer.gate) as gate_calls:
        out = block.forward(x)

    # Without shared experts the gate ran once in 0.19.1 already.
    assert len(gate_calls) == (2 if EXPECT_BUG and shared else 1)
    error = relative_rms_error(out, block.reference(x))
    gpu_env.record(
        "qwen3 forward",
        dtype=dtype,
        shared=shared,
        error=error,
        tolerance=qwen3_tolerance(dtype),
        gate_calls=len(gate_calls),
    )
    assert out.dtype == dtype and error <= qwen3_tolerance(dtype)


@dtypes
@shared_or_not
def test_qwen3_router_gemms_seen_by_the_profiler(qwen3, workdir, dtype, shared):
    """The CUDA kernels of one forward, each attributed to the aten GEMM op that launched
    it: the router GEMM ([n, hidden] @ [hidden, experts]) runs once (twice on pristine
    with shared experts); the shared expert adds three GEMMs (gate_up, down and the
    one-column shared_expert_gate); the routed experts run in Triton's fused-MoE kernel."""
    block = build_qwen3(qwen3, workdir, dtype, shared, seed=2)
    x = block.tokens(16, seed=3)
    block.forward(x)  # compiles the Triton kernels outside the profile

    seen = cuda_layers.profile(lambda: block.forward(x))

    routers = 2 if EXPECT_BUG and shared else 1
    gpu_env.record("qwen3 profile", dtype=dtype, shared=shared, **seen.summary())
    router_gemms = seen.gemms_shaped((len(x), HIDDEN), (HIDDEN, NUM_EXPERTS))
    assert len(router_gemms) == routers, seen.summary()
    assert len(seen.gemms) == routers + (3 if shared else 0), seen.summary()
    assert all(gemm.kernels for gemm in seen.gemms), seen.summary()
    assert any("fused_moe" in kernel for kernel in seen.kernels), seen.kernels


# --- CUDA graphs ----------------------------------------------------------------


def assert_replay_is_eager(
    replayed: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Same kernels on the same data: equal, up to a GEMM's choice of summation order
    under capture (within one rounding)."""
    error = relative_rms_error(replayed, eager)
    gpu_env.record(what, dtype=dtype, bitwise_equal=torch.equal(replayed, eager), error=error)
    assert error <= UNIT_ROUNDOFF[dtype], f"{what}: {error:.2e}"


@dtypes
def test_qwen3_cuda_graph_replay_matches_eager(qwen3, workdir, dtype):
    block = build_qwen3(qwen3, workdir, dtype, shared=True, seed=4)
    static = block.tokens(TOKENS, seed=5)
    graph, out = cuda_layers.capture(block.layer, block.config, static)

    for seed in (6, 7):  # new data in the static input: the replay computes, not recalls
        x = block.tokens(TOKENS, seed=seed)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        assert_replay_is_eager(replayed, block.forward(x), dtype, "qwen3 graph replay")
        assert relative_rms_error(replayed, block.reference(x)) <= qwen3_tolerance(dtype)


@dtypes
def test_gemma4_cuda_graph_replay_matches_eager(gemma4, workdir, dtype):
    moe = build_gemma4(gemma4, workdir, dtype, seed=11)
    static_x, static_logits = gemma4_inputs(TOKENS, seed=12, dtype=dtype)
    graph, out = cuda_layers.capture(moe.layer, moe.config, static_x, static_logits)

    for seed in (13, 14):
        x, logits = gemma4_inputs(TOKENS, seed=seed, dtype=dtype)
        static_x.copy_(x)
        static_logits.copy_(logits)
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        assert_replay_is_eager(replayed, moe.forward(x, logits), dtype, "gemma4 graph replay")
        error = relative_rms_error(replayed, moe.reference(x, logits, moe.scale))
        assert error <= tolerance(dtype, reduction=max(HIDDEN, MOE_INTERMEDIATE))
